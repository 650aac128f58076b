"""Command line: ``covidscan <command>``. Each command declares its arguments and calls one
library function; shared options are declared once (:mod:`covidscan.cli.common`).

Building the parser imports no torch: each command imports its library function when it
runs, so ``covidscan --help``, ``--version`` and ``stats`` start in well under a second
(torch alone takes seconds to import). Every covidscan error (:class:`covidscan.errors.CovidscanError`)
and the usual bad-input errors become one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from covidscan import __version__
from covidscan.cli import data_cmds, evaluate_cmds, predict_cmds, serve_cmds, train_cmds
from covidscan.errors import CovidscanError

GROUPS = (data_cmds, train_cmds, predict_cmds, evaluate_cmds, serve_cmds)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="covidscan",
        description="COVID-19 detection on chest X-ray and CT (research use only; not a medical device)",
    )
    parser.add_argument("--version", action="version", version=f"covidscan {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:  # listed in --help in the order of use: data, train, use, evaluate, serve
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr
    )
    try:
        if getattr(args, "model", None):  # --model NAME: the zoo's checkpoint, wherever --checkpoint is taken
            from covidscan.zoo import checkpoint_path

            args.checkpoint = checkpoint_path(args.model)
        return int(args.func(args) or 0)
    except (CovidscanError, FileNotFoundError, NotADirectoryError, ValueError, ImportError) as exc:
        print(f"covidscan: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("covidscan: interrupted", file=sys.stderr)
        return 130

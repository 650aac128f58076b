"""Command line: each subcommand parses its arguments and calls one library function."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger("covidscan")


class CLIError(Exception):
    """An error shown to the user as one line, exit status 2."""


def _add_data_args(p: argparse.ArgumentParser, *, many: bool = True) -> None:
    p.add_argument(
        "data",
        nargs="+" if many else None,
        type=Path,
        help="dataset folder(s) (ROOT/<label>/*, or holding manifest.csv) or manifest CSV(s)",
    )
    p.add_argument(
        "--task",
        choices=["xray", "ct"],
        default=None,
        help="class list to use (default: inferred; pneumonia present -> xray)",
    )


def cmd_stats(args) -> int:
    from covidscan.data import compute_stats, format_stats, load_dataset

    index = load_dataset(args.data, args.task)
    stats = compute_stats(index, original=args.original, strict=args.strict)
    if args.json:
        print(json.dumps(stats.to_dict(), indent=2))
    else:
        print(format_stats(stats))
    for label in index.single_source_classes():
        if len(index.origins) > 1 or len({r.source for r in index.records}) > 1:
            logger.warning("class %r comes from a single source: a model may learn the source, not the class", label)
    return 0


def cmd_split(args) -> int:
    from covidscan.data import grouped_split, load_dataset, paper_split, write_split

    index = load_dataset(args.data, args.task)
    if args.protocol == "paper":
        split = paper_split(index, test=args.test, val=args.val, seed=args.seed)
    else:
        split = grouped_split(index, test=args.test, val=args.val, seed=args.seed)
    write_split(split, args.out)
    print(split.format_counts())
    problems = split.audit()
    for p in problems:
        logger.warning("split audit: %s", p)
    if not problems:
        print("audit: no group in two splits; every split's class proportions within 2 points of the whole")
    if split.protocol != "grouped":
        logger.warning(
            "image-level split (%s): images of one patient can be in train and test; results on it are optimistic",
            split.protocol,
        )
    print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from covidscan import __version__

    parser = argparse.ArgumentParser(
        prog="covidscan",
        description="COVID-19 detection on chest X-ray and CT (research use only; not a medical device)",
    )
    parser.add_argument("--version", action="version", version=f"covidscan {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stats", help="per-class image counts and resolution statistics (paper Tables I/II)")
    _add_data_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--original", action="store_true", help="use the manifest's original_width/height")
    p.add_argument("--strict", action="store_true", help="fail on the first unreadable image instead of skipping")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("split", help="leak-free train/val/test split written as a manifest with a split column")
    _add_data_args(p)
    p.add_argument("--out", type=Path, required=True, help="split CSV to write")
    p.add_argument("--test", type=float, default=0.2)
    p.add_argument("--val", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--protocol",
        choices=["grouped", "paper"],
        default="grouped",
        help="grouped (default, patient-level) or paper (image-level 80/20 as Berrimi et al.)",
    )
    p.set_defaults(func=cmd_split)

    _register_model_commands(sub)
    return parser


def _register_model_commands(sub) -> None:
    """Commands that need torch; registered lazily-importing so `stats` stays fast."""
    try:
        from covidscan import commands
    except ImportError as exc:  # pragma: no cover
        logger.debug("model commands unavailable: %s", exc)
        return
    commands.register(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr
    )
    from covidscan.checkpoint import CheckpointError
    from covidscan.data.io import ImageReadError

    try:
        return int(args.func(args) or 0)
    except (CLIError, FileNotFoundError, ValueError, ImageReadError, CheckpointError, ImportError) as exc:
        print(f"covidscan: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("covidscan: interrupted", file=sys.stderr)
        return 130

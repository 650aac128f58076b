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
X = "../shared/data/xray ../shared/data/xray-extra ../shared/data/xray-lungs"
EXAMPLES = {
    "stats": "covidscan stats ../shared/data/xray ../shared/data/ct-volumes",
    "split": "covidscan split ../shared/data/xray --out split.csv --test 0.2 --val 0.1",
    "pack": "covidscan pack ../shared/data/xray --out packed --size 224 (then covidscan pack --verify packed)",
    "study-slices": "covidscan study-slices ../shared/data/ct-volumes --out runs/ctmd --source COVID-CT-MD",
    "train": f"covidscan train --config configs/xray_recommended.yaml --data {X} --out runs/recommended",
    "train-ensemble": f"covidscan train-ensemble --config configs/xray_recommended.yaml --config configs/xray_inception_finetune.yaml --data {X} --out runs/mixed",
    "lungs": "covidscan lungs --data ../shared/data/xray-lungs --out runs/lungs",
    "augment-preview": "covidscan augment-preview ../shared/data/xray --config configs/xray_recommended.yaml --out aug.png",
    "loso": f"covidscan loso --config configs/xray_recommended.yaml --data {X} --sources hannover+nih covid-cxnet+openist --out runs/loso",
    "reproduce": "covidscan reproduce --task xray --data ../shared/data/xray --out runs/paper --epochs 2",
    "evaluate": "covidscan evaluate --model xray --data YOUR_LABELLED_SCANS --out runs/site --by view",
    "probe": "covidscan probe --checkpoint runs/recommended/best.pt --out runs/probe",
    "calibrate": "covidscan calibrate --model xray --data YOUR_LABELLED_SCANS --sensitivity 0.95 --out site.pt",
    "adapt": "covidscan adapt --model xray YOUR_UNLABELLED_SCANS/ --out adapted.pt",
    "card": "covidscan card --checkpoint runs/recommended/best.pt --metrics runs/recommended/eval/metrics.json --out card.md",
    "summary": "covidscan summary --config configs/xray_new_densenet.yaml --diagram fig.png",
    "serve": "covidscan serve --model xray --port 8000 (then open http://127.0.0.1:8000)",
    "export": "covidscan export --model xray --onnx xray.onnx",
    "ensemble": "covidscan ensemble runs/a/best.pt runs/b/best.pt --out ens.pt",
}


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
    for name, sp in sub.choices.items():  # every command's --help ends with an example
        if "Example" not in (sp.description or "") and name in EXAMPLES:
            help_text = next((a.help for a in sub._choices_actions if a.dest == name), "")  # noqa: SLF001
            sp.description = f"{sp.description or help_text}. Example: {EXAMPLES[name]}"
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

"""Options shared by several commands, declared once. Imports nothing heavy."""

from __future__ import annotations

import argparse
from pathlib import Path

from covidscan.labels import TASKS


def add_data(p: argparse.ArgumentParser, *, positional: bool = True, required: bool = True, help_extra: str = "") -> None:
    """``DATA...`` (or ``--data DATA...``): folders ``ROOT/<label>/*``, folders holding manifest.csv, or manifest CSVs."""
    text = "dataset folder(s) (ROOT/<label>/*, or holding manifest.csv) or manifest CSV(s)" + help_extra
    if positional:
        p.add_argument("data", nargs="+", type=Path, help=text)
    else:
        p.add_argument("--data", nargs="+", type=Path, required=required, help=text)


def add_task(p: argparse.ArgumentParser, default_help: str = "inferred; pneumonia present -> xray") -> None:
    p.add_argument("--task", choices=sorted(TASKS), default=None, help=f"class list to use (default: {default_help})")


def add_checkpoint(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    """``--checkpoint PATH`` or ``--model NAME`` (a model of the zoo; :func:`covidscan.cli.main` resolves it)."""
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--checkpoint", type=Path, help="a covidscan checkpoint (best.pt of a run)")
    g.add_argument(
        "--model", metavar="NAME", help="a ready model of the zoo instead of a checkpoint (covidscan models lists them)"
    )


def add_out(p: argparse.ArgumentParser, what: str, *, required: bool = True) -> None:
    p.add_argument("--out", type=Path, required=required, help=what)


def add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. train.epochs=3 (repeatable)"
    )


def add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="recipe YAML (configs/*.yaml)")


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")


def add_bootstrap(p: argparse.ArgumentParser, default: int) -> None:
    p.add_argument("--bootstrap", type=int, default=default, help="bootstrap resamples for the 95 percent intervals")


def add_study(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--study", action="append", default=[], metavar="KEY=VALUE",
        help="CT studies: override the checkpoint's study settings, e.g. window_center=-650, frame=lungs, rule=max",
    )  # fmt: skip


def add_subset(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", type=Path, help="split CSV; evaluates its --subset")
    p.add_argument("--subset", choices=["train", "val", "test"], default="test", help="which part of --split (default test)")


def add_backend(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend", choices=["torch", "onnxruntime"], default="torch",
        help="onnxruntime: the forward pass as the exported ONNX graph on the CPU (2.8x faster for DenseNet121, "
        "same probabilities; a few seconds to export at start; needs onnx + onnxruntime)",
    )  # fmt: skip

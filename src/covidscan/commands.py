"""Subcommands that need the model stack (train, evaluate, predict ...)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger("covidscan")


def cmd_train(args) -> int:
    import torch

    from covidscan.config import load_config
    from covidscan.engine import train

    if not args.resume and not args.data and not args.split:
        raise ValueError("train needs --data (or --split), or --resume")
    # with --resume the run's own saved config is used
    cfg = load_config(args.config, args.set) if not args.resume else load_config(None)
    torch.manual_seed(cfg.train.seed)  # the CLI is the one place that seeds globally
    result = train(cfg, args.data, args.out, split_file=args.split, resume=args.resume, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun, rank 0 reports
    m = result.best_metrics
    print(
        f"best epoch {result.best_epoch}: val acc {m.get('val_acc', float('nan')):.4f}  val loss {m.get('val_loss', float('nan')):.4f}"
    )
    print(f"weights source: {result.weights_source}")
    print(f"checkpoint: {result.best_checkpoint}   ({result.seconds:.0f} s)")
    return 0


def cmd_augment_preview(args) -> int:
    from covidscan.reports import augment_preview

    path = augment_preview(args.data, args.out, config=args.config, overrides=args.set, n=args.n, seed=args.seed, task=args.task)
    print(f"wrote {path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model (one loop for every backbone, head and task)")
    p.add_argument("--config", type=Path, help="recipe YAML (configs/*.yaml)")
    p.add_argument("--data", type=Path, nargs="+", help="dataset folder(s) or manifest(s)")
    p.add_argument("--split", type=Path, help="split CSV from `covidscan split` (else a grouped split is made)")
    p.add_argument("--out", type=Path, required=True, help="run folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.epochs=3")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("augment-preview", help="grid of augmented training samples (paper Fig. 5)")
    p.add_argument("data", type=Path, nargs="+")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--config", type=Path)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--n", type=int, default=4, help="scans (rows); each row shows the original and 5 augmentations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", choices=["xray", "ct"])
    p.set_defaults(func=cmd_augment_preview)

    try:
        from covidscan import commands_use
    except ImportError:  # pragma: no cover
        return
    commands_use.register(sub)

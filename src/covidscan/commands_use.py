"""Subcommands that use or assess trained checkpoints."""

from __future__ import annotations

from pathlib import Path


def cmd_evaluate(args) -> int:
    from covidscan.evaluation import evaluate
    from covidscan.reports import evaluation_markdown

    result = evaluate(
        args.checkpoint,
        args.data,
        split_file=args.split,
        subset=args.subset,
        out=args.out,
        grid=args.grid,
        n_boot=args.bootstrap,
        progress=not args.quiet,
    )
    print(evaluation_markdown(result))
    print(f"wrote {args.out}/report.md, metrics.json and figures")
    return 0


def cmd_reproduce(args) -> int:
    from covidscan.reproduce import reproduce

    res = reproduce(
        args.task,
        args.data,
        args.out,
        epochs=args.epochs,
        early_stopping=args.early_stopping,
        configs_dir=args.configs,
        overrides=args.set,
        n_boot=args.bootstrap,
        progress=not args.quiet,
        protocols=tuple(args.protocols),
        models=tuple(args.models),
    )
    print((Path(args.out) / "table.md").read_text())
    del res
    return 0


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="metrics with 95% CIs, calibration, ROC, report.md (internal or external data)")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--data", type=Path, nargs="+", help="dataset(s) to evaluate in full (external validation)")
    p.add_argument("--split", type=Path, help="split CSV; evaluates its --subset")
    p.add_argument("--subset", choices=["train", "val", "test"], default="test")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--grid", type=int, default=0, help="also draw N test scans with predictions (paper Fig. 8/9)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    from covidscan.reproduce import PAPER_MODELS, PROTOCOLS

    p = sub.add_parser("reproduce", help="train + evaluate the paper's three models under both protocols (Tables III/IV)")
    p.add_argument("--task", choices=["xray", "ct"], required=True)
    p.add_argument("--data", type=Path, nargs="+", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epochs", type=int, help="override the recipes' 50 epochs")
    p.add_argument("--early-stopping", type=int, help="patience in epochs (0 = off)")
    p.add_argument("--configs", type=Path, default=Path("configs"), help="folder of the paper recipes")
    p.add_argument("--models", nargs="+", choices=list(PAPER_MODELS), default=list(PAPER_MODELS))
    p.add_argument("--protocols", nargs="+", choices=list(PROTOCOLS), default=list(PROTOCOLS))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_reproduce)

"""``train``, ``augment-preview``, ``loso`` and ``reproduce``: commands that train models."""

from __future__ import annotations

import os
from pathlib import Path

import covidscan.cli.common as common
from covidscan.errors import CLIError
from covidscan.experiments.paper import PAPER_MODELS, PROTOCOLS
from covidscan.labels import TASKS


def cmd_train(args) -> int:
    import torch

    from covidscan.config import load_config
    from covidscan.training import train

    if args.tensorboard:
        args.set = [*args.set, "train.log=tensorboard"]
    if args.resume:
        # the run's own saved config; --config / --set may only change what a resume allows (more epochs ...)
        asked = None
        if args.config or args.set:
            asked = load_config(args.config or args.out / "config.yaml", args.set)
        cfg = asked
    else:
        if not args.data and not args.split:
            raise CLIError("train needs --data (or --split), or --resume")
        cfg = load_config(args.config, args.set)
    torch.manual_seed(cfg.train.seed if cfg else 0)  # the CLI is the one place that seeds globally
    result = train(
        cfg, args.data, args.out, split_file=args.split, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet
    )
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
    from covidscan.training.preview import augment_preview

    path = augment_preview(args.data, args.out, config=args.config, overrides=args.set, n=args.n, seed=args.seed, task=args.task)
    print(f"wrote {path}")
    return 0


def cmd_loso(args) -> int:
    from covidscan.config import load_config
    from covidscan.experiments.loso import leave_one_source_out

    cfg = load_config(args.config, args.set)
    leave_one_source_out(
        cfg,
        args.data,
        args.out,
        sources=args.sources,
        field=args.field,
        n_boot=args.bootstrap,
        progress=not args.quiet,
        resume=args.resume,
    )
    print((Path(args.out) / "loso.md").read_text())
    return 0


def cmd_reproduce(args) -> int:
    from covidscan.experiments.reproduce import reproduce

    reproduce(
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
    return 0


def cmd_train_ensemble(args) -> int:
    import time

    from covidscan.config import load_config
    from covidscan.training import train_ensemble

    t0 = time.perf_counter()
    seeds = args.seeds or [None]
    members = [(c, s) for c in args.config for s in seeds]
    if len(members) < 2:
        raise CLIError("an ensemble needs at least two members: repeat --config, or give several --seeds")
    configs = [load_config(c, args.set + ([f"train.seed={s}"] if s is not None else [])) for c, s in members]
    path, results = train_ensemble(configs, args.data, args.out, overwrite=args.overwrite, progress=not args.quiet)
    for (cfg_path, seed), r in zip(members, results):
        print(
            f"member {cfg_path}{'' if seed is None else f' seed {seed}'}: best epoch {r.best_epoch}, val acc {r.best_metrics.get('val_acc', float('nan')):.4f} ({r.seconds:.0f} s)"
        )
    print(f"checkpoint: {path}   ({time.perf_counter() - t0:.0f} s)")
    return 0


def cmd_loso_report(args) -> int:
    from covidscan.experiments.pooling import pool, pool_adapted, report_markdown, site_adaptation, val_threshold

    r = pool(args.runs, by=args.by, data=args.data, n_boot=args.bootstrap)
    val = val_threshold(args.runs) if args.val_threshold else None
    site = site_adaptation(args.runs[0], tta=args.tta) if args.site_adaptation else None
    adapted = pool_adapted(args.runs, tta=args.tta, n_boot=args.bootstrap) if args.site_adaptation else None
    md = report_markdown(r, val, site, adapted)
    print(md)
    if args.out:
        Path(args.out).write_text(md, encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


def cmd_ledger(args) -> int:
    from covidscan.experiments.ledger import load_ledger, report_split, resolve_runs, run_variant, variant_of
    from covidscan.experiments.pooling import pool, report_markdown

    variants, ensembles = load_ledger(args.ledger)
    if args.action == "list":
        for v in variants.values():
            seeds = f" seeds {v.seeds}" if v.seeds else ""
            print(f"{v.name:<18} {v.config} {' '.join('--set ' + s for s in v.set)} [{v.yardstick}]{seeds}")
        for k, members in ensembles.items():
            print(f"{k:<18} ensemble of {' + '.join(members)}")
        return 0
    if not args.names:
        raise CLIError(f"ledger {args.action}: name at least one variant{' or ensemble' if args.action == 'report' else ''}")
    for name in args.names:
        if args.action == "run":
            variant, only = variant_of(name, variants)
            run_variant(variant, args.data_root, args.out, progress=not args.quiet, only=only)
        else:
            split = report_split(name, variants, ensembles, args.data_root, args.out)
            for runs in resolve_runs(name, variants, ensembles, args.out):
                print(report_markdown(pool(runs, n_boot=args.bootstrap, **split)))
    return 0


def cmd_lungs(args) -> int:
    from covidscan.training.lungseg import train_lungs

    info = train_lungs(args.data, args.out, epochs=args.epochs, seed=args.seed, progress=not args.quiet)
    print(
        f"held-out Dice {info['dice_heldout_mean']:.4f} (min {info['dice_heldout_min']:.4f}, {info['heldout_images']} images); "
        f"trained on {info['train_images']} in {info['seconds']:.0f} s"
    )
    print(f"wrote {args.out}/lungseg_unet128.pt and lungseg.json")
    return 0


def register(sub) -> None:
    p = sub.add_parser("train-ensemble", help="train one model per --config on one split and average them (one checkpoint)")
    p.add_argument("--config", type=Path, action="append", required=True, help="a member's recipe (repeatable)")
    p.add_argument(
        "--seeds", type=int, nargs="+", metavar="SEED", help="train each recipe once per seed (train.seed), e.g. --seeds 0 1"
    )
    common.add_data(p, positional=False)
    common.add_out(p, "folder for member0, member1, ... and ensemble.pt")
    common.add_set(p)
    p.add_argument("--overwrite", action="store_true", help="replace an ensemble already in --out")
    common.add_quiet(p)
    p.set_defaults(func=cmd_train_ensemble)

    p = sub.add_parser("lungs", help="train the lung segmentation U-Net on images with masks (xray-lungs)")
    common.add_data(p, positional=False, help_extra=" with a mask column")
    common.add_out(p, "folder for lungseg_unet128.pt and lungseg.json")
    p.add_argument("--epochs", type=int, default=40, help="training epochs of the U-Net (default 40)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split and the initial weights (default 0)")
    common.add_quiet(p)
    p.set_defaults(func=cmd_lungs)

    p = sub.add_parser("train", help="train a model (one loop for every backbone, head and task)")
    common.add_config(p)
    common.add_data(p, positional=False, required=False)
    p.add_argument("--split", type=Path, help="split CSV from `covidscan split` (else a grouped split is made)")
    common.add_out(p, "run folder (refused when it already holds a run, unless --resume or --overwrite)")
    common.add_set(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--resume", action="store_true", help="continue the interrupted run in --out (--set train.epochs=N adds epochs)"
    )
    g.add_argument("--overwrite", action="store_true", help="start again in an --out that already holds a run")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard event files to RUN/tensorboard")
    common.add_quiet(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("augment-preview", help="grid of augmented training samples (paper Fig. 5)")
    common.add_data(p)
    common.add_out(p, "PNG to write")
    common.add_config(p)
    common.add_set(p)
    p.add_argument("--n", type=int, default=4, help="scans (rows); each row shows the original and 5 augmentations")
    p.add_argument("--seed", type=int, default=0, help="which scans are drawn and how they are augmented (default 0)")
    common.add_task(p)
    p.set_defaults(func=cmd_augment_preview)

    p = sub.add_parser("loso", help="leave-one-source-out: train on all sources but one, test on the one left out")
    common.add_config(p)
    common.add_data(p, positional=False)
    common.add_out(p, "folder for one subfolder per fold, loso.json and loso.md")
    p.add_argument(
        "--sources", nargs="+", help="the folds: left-out sources, several joined with + (default: each source in turn)"
    )
    p.add_argument(
        "--field",
        default="source",
        help="hold out values of this manifest field instead of sources, e.g. patient_id --sources p001 cap001 normal001: "
        "one CT patient per fold, the rest of that hospital kept in training",
    )
    common.add_set(p)
    common.add_bootstrap(p, 500)
    p.add_argument("--resume", action="store_true", help="keep folds that already finished in --out (same config)")
    common.add_quiet(p)
    p.set_defaults(func=cmd_loso)

    p = sub.add_parser(
        "loso-report",
        help="pool leave-source-out runs (one, or several averaged as an ensemble): AUROC per fold and pooled, fixed-threshold specificity",
        description="Example: covidscan loso-report runs/exp/rec_pbn_seed0 runs/exp/incv3_plain_seed0 --by view --data ../shared/data/xray-extra",
    )
    p.add_argument("runs", type=Path, nargs="+", help="covidscan loso output folders with the same folds (several: averaged)")
    p.add_argument(
        "--by",
        default="",
        help="also split the fixed-threshold specificity by a manifest field (view; patient_id: each held-out CT patient), "
        "with each value's AUROC against the fold's COVID images",
    )
    p.add_argument("--data", type=Path, nargs="*", default=[], help="dataset folders whose manifests hold that field")
    p.add_argument("--val-threshold", action="store_true", help="also the threshold from each fold's own validation split")
    p.add_argument(
        "--site-adaptation",
        action="store_true",
        help="also BatchNorm adaptation (every run, pooled) and a site threshold (first run)",
    )
    p.add_argument("--tta", action="store_true", help="site adaptation figures with test-time augmentation (image + mirror)")
    common.add_bootstrap(p, 500)
    p.add_argument("--out", type=Path, help="also write the report to this markdown file")
    p.set_defaults(func=cmd_loso_report)

    p = sub.add_parser(
        "ledger",
        help="the experiment ledger (experiments/ledger.yaml): list, run or report the leave-source-out variants measured",
        description="Example: covidscan ledger run rec_pbn --out runs/exp; covidscan ledger report zoo_xray --out runs/exp",
    )
    p.add_argument("action", choices=["list", "run", "report"], help="list the ledger, train variants, or pool them")
    p.add_argument("names", nargs="*", help="variants or one seed's run, NAME_seedS (run); variants, runs or ensembles (report)")
    p.add_argument(
        "--ledger", type=Path, default=Path("experiments/ledger.yaml"), help="ledger file (default experiments/ledger.yaml)"
    )
    p.add_argument("--data-root", type=Path, default=Path("../shared/data"), help="folder holding the yardsticks' datasets")
    p.add_argument("--out", type=Path, default=Path("runs/exp"), help="folder of the run folders (default runs/exp)")
    common.add_bootstrap(p, 500)
    common.add_quiet(p)
    p.set_defaults(func=cmd_ledger)

    p = sub.add_parser("reproduce", help="train + evaluate the paper's three models under both protocols (Tables III/IV)")
    p.add_argument("--task", choices=sorted(TASKS), required=True, help="xray (Table III) or ct (Table IV)")
    common.add_data(p, positional=False)
    common.add_out(p, "folder for the runs, results.json and table.md")
    p.add_argument("--epochs", type=int, help="override the recipes' 50 epochs")
    p.add_argument("--early-stopping", type=int, help="patience in epochs (0 = off)")
    p.add_argument("--configs", type=Path, default=Path("configs"), help="folder of the paper recipes")
    p.add_argument(
        "--models",
        nargs="+",
        choices=list(PAPER_MODELS),
        default=list(PAPER_MODELS),
        help="the paper's models to run (default all three)",
    )
    p.add_argument(
        "--protocols", nargs="+", choices=list(PROTOCOLS), default=list(PROTOCOLS),
        help="paper: its image-level 80/20 split; grouped: covidscan's patient-grouped split (default both)",
    )  # fmt: skip
    common.add_set(p)
    common.add_bootstrap(p, 1000)
    common.add_quiet(p)
    p.set_defaults(func=cmd_reproduce)

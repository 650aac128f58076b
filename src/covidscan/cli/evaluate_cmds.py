"""Commands that assess a model and fit it to a site: evaluate, probe, calibrate, adapt, card, summary."""

from __future__ import annotations

from pathlib import Path

import covidscan.cli.common as common


def cmd_evaluate(args) -> int:
    from covidscan.evaluation import evaluate
    from covidscan.reports import evaluation_markdown

    data = args.data if isinstance(args.data, list) else [args.data] if args.data else []
    if len(data) == 1 and not args.split:
        from covidscan.data.volume import is_studies_folder

        if is_studies_folder(data[0]):
            return _evaluate_studies(args, data[0])

    result = evaluate(
        args.checkpoint,
        args.data,
        split_file=args.split,
        subset=args.subset,
        out=args.out,
        grid=args.grid,
        grid_errors_first=not args.grid_random,
        n_boot=args.bootstrap,
        device=args.device,
        progress=not args.quiet,
        tta=args.tta,
        by=tuple(args.by),
    )
    print(evaluation_markdown(result))
    print(f"wrote {args.out}/report.md, metrics.json, predictions.csv and figures")
    return 0


def _evaluate_studies(args, data) -> int:
    from covidscan.inference import Predictor
    from covidscan.study import study_config
    from covidscan.study_files import evaluate_studies, studies_markdown

    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, tta=args.tta)
    summary = evaluate_studies(predictor, data, args.out, cfg=study_config(predictor, args.study))
    print(studies_markdown(summary))
    print(f"wrote {args.out}/report.md, studies.json and per-study slices.csv / slices.png / montage.png")
    return 0


def cmd_probe(args) -> int:
    from covidscan.probe import probe, probe_markdown
    from covidscan.results import write_json

    r = probe(args.checkpoint, args.data, split_file=args.split, subset=args.subset, device=args.device)
    md = probe_markdown(r)
    print(md)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "probe.md").write_text(md)
        write_json(r, args.out / "probe.json")
    return 0


def cmd_card(args) -> int:
    from covidscan.card import model_card

    md = model_card(args.checkpoint, metrics=args.metrics, probe=args.probe)
    if args.out:
        args.out.write_text(md)
        print(f"wrote {args.out}")
    else:
        print(md)
    return 0


def cmd_summary(args) -> int:
    from covidscan.config import load_config
    from covidscan.errors import CLIError
    from covidscan.summary import model_for, stage_diagram, summary_table

    if (args.config is None) == (args.checkpoint is None) and not args.set:
        raise CLIError("summary: give --config C (or --set model.backbone=...) or --checkpoint K")
    cfg = None if args.checkpoint else load_config(args.config, args.set)
    model, size, title = model_for(cfg, args.checkpoint)
    print(title)
    print(summary_table(model, size, depth=args.depth))
    if args.diagram:
        print(f"wrote {stage_diagram(model, size, args.diagram, title)}")
    return 0


def cmd_calibrate(args) -> int:
    from covidscan.adapt import calibrate
    from covidscan.results import fmt_interval

    meta = calibrate(
        args.checkpoint, args.data, args.out, sensitivity=args.sensitivity, device=args.device,
        allow_training_images=args.allow_training_images, n_boot=args.bootstrap,
    )  # fmt: skip
    t = meta.threshold
    lo, hi = t["value_ci95"]
    level = "study scores (patients)" if t.get("level") == "study" else "image scores"
    print(f"threshold for {t['class']} on {level}: {t['value']:.4f} (95% interval over resampled patients {lo:.4f} to {hi:.4f})")
    print(f"  sensitivity {fmt_interval(t['sensitivity'], t['sensitivity_ci95'])} % of {t['positives']} positives")
    print(f"  specificity {fmt_interval(t['specificity'], t['specificity_ci95'])} % of {t['negatives']} negatives")
    print(f"  on {t['data']}; {t['overlap']['summary']}")
    for w in t["warnings"]:
        print(f"  warning: {w}")
    print(f"wrote {args.out}")
    return 0


def cmd_adapt(args) -> int:
    from covidscan.adapt import adapt

    meta = adapt(args.checkpoint, args.images, args.out, device=args.device)
    print(f"BatchNorm statistics re-estimated on {meta.adaptation['images']} image(s); wrote {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="metrics with 95 percent CIs, calibration, ROC, report.md (internal or external data)")
    common.add_checkpoint(p)
    common.add_data(
        p, positional=False, required=False,
        help_extra=": evaluated in full; the report says how many of them the model trained or validated on "
        "(external only when none)",
    )  # fmt: skip
    common.add_subset(p)
    common.add_out(p, "folder for report.md, metrics.json, predictions.csv and figures")
    p.add_argument("--grid", type=int, default=0, help="also draw N test scans with file names and predictions, mistakes first")
    p.add_argument("--grid-random", action="store_true", help="draw the grid's scans at random (the paper's Fig. 8/9)")
    common.add_study(p)
    p.add_argument("--tta", action="store_true", help="test-time augmentation: average each image with its mirror image")
    p.add_argument(
        "--by", action="append", default=[], metavar="FIELD",
        help="also report subgroups by a manifest field: source, or a column / source_label entry such as view (repeatable)",
    )  # fmt: skip
    common.add_bootstrap(p, 1000)
    common.add_device(p)
    common.add_quiet(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("probe", help="shortcut probe: accuracy with the lungs masked out, and with only the lungs")
    common.add_checkpoint(p)
    common.add_data(p, positional=False, required=False)
    common.add_subset(p)
    common.add_out(p, "folder for probe.md / probe.json", required=False)
    common.add_device(p)
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("calibrate", help="choose the COVID threshold for a target sensitivity on your own labelled scans")
    common.add_checkpoint(p)
    common.add_data(p, positional=False, help_extra=" with labels, from the site the model will be used at")
    p.add_argument("--sensitivity", type=float, default=0.95, help="target COVID sensitivity (default 0.95)")
    p.add_argument(
        "--allow-training-images", action="store_true",
        help="calibrate even when some scans are (near-duplicates of) images the model trained or validated on; "
        "the stored threshold records it",
    )  # fmt: skip
    common.add_out(p, "checkpoint to write: the same model with the threshold stored")
    common.add_bootstrap(p, 1000)
    common.add_device(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("adapt", help="re-estimate BatchNorm statistics on unlabelled scans of a new site (AdaBN)")
    common.add_checkpoint(p)
    p.add_argument(
        "images",
        type=Path,
        nargs="+",
        help="image files or folders of the new site, or one packed folder (no labels needed); for a CT model also "
        "series (DICOM folders, NIfTI, zip, a studies folder), read by their lung slices as studies are scored",
    )
    common.add_out(p, "checkpoint to write: the adapted model")
    common.add_device(p)
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("card", help="model card (markdown) for a checkpoint")
    common.add_checkpoint(p)
    p.add_argument("--metrics", type=Path, help="metrics.json from covidscan evaluate")
    p.add_argument("--probe", type=Path, help="probe.json from covidscan probe --out")
    common.add_out(p, "markdown file to write (default: print)", required=False)
    p.set_defaults(func=cmd_card)

    p = sub.add_parser("summary", help="layer table (output shapes, parameters) and a block diagram (paper Figs. 6/7)")
    common.add_config(p)
    common.add_set(p)
    p.add_argument("--checkpoint", type=Path, help="summarise a trained checkpoint instead of a recipe")
    p.add_argument("--model", metavar="NAME", help="summarise a model of the zoo (covidscan models)")
    p.add_argument("--depth", type=int, default=2, help="nesting depth of the layer table")
    p.add_argument("--diagram", type=Path, help="also draw the stages and head to this PNG")
    p.set_defaults(func=cmd_summary)

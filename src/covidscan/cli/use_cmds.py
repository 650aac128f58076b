"""Commands that use or assess a trained checkpoint: evaluate, predict, explain, serve, export, probe, card."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from covidscan.cli import common


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
    from covidscan.study import evaluate_studies, studies_markdown, study_config

    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, tta=args.tta)
    summary = evaluate_studies(predictor, data, args.out, cfg=study_config(predictor, args.study))
    print(studies_markdown(summary))
    print(f"wrote {args.out}/report.md, studies.json and per-study slices.csv / slices.png / montage.png")
    return 0


def expand_paths(paths: list[Path]) -> list[Path]:
    """Files as given; folders expanded to the image files under them (sorted)."""
    from covidscan.data.io import is_image_file

    out = []
    for p in paths:
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".") and is_image_file(f))
        else:
            out.append(p)
    return out


def _decision_text(r: dict) -> str:
    d = r.get("decision")
    if not d:
        return ""
    return f"{d['class']} {'POSITIVE' if d['positive'] else 'negative'} (p >= {d['threshold']:.3f})"


def _print_table(results: list[dict], names: list[str]) -> None:
    width = max([len(r["source"]) for r in results] + [4])
    thresholded = any(r.get("decision") for r in results)
    head = f"{'file':<{width}}  {'label':<10} " + " ".join(f"{n:>10}" for n in names)
    print(head + ("  at threshold" + " " * 20 if thresholded else "") + "  warnings")
    for r in results:
        probs = " ".join(f"{r['probabilities'][n]:>10.4f}" for n in names)
        decision = f"  {_decision_text(r):<33}" if thresholded else ""
        label = "(outside)" if r.get("out_of_distribution") else r["label"]  # no class for a scan the model does not know
        print(f"{r['source']:<{width}}  {label:<10} {probs}{decision}  {'; '.join(r['warnings'])}")


def cmd_predict(args) -> int:
    import csv

    from covidscan.errors import ImageReadError
    from covidscan.inference import Predictor
    from covidscan.results import dumps

    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, tta=args.tta, backend=args.backend)
    names = predictor.class_names
    results, failed = [], 0
    if predictor.task == "ct":
        from covidscan.study import find_studies

        studies, files = find_studies(args.paths)
        failed += _predict_studies(predictor, studies, args)
        if studies and not files:
            return 1 if failed else 0
    else:
        files = expand_paths(args.paths)
    bar = None
    if len(files) > 1 and not args.quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(files), unit="img", desc="predict", file=sys.stderr, leave=False)
    for path in files:
        try:
            results.append(predictor.predict(path).to_dict())
        except (ImageReadError, FileNotFoundError) as exc:
            failed += 1
            print(f"covidscan: error: {exc}", file=sys.stderr)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    if args.json:
        print(dumps(results, indent=2))
    elif args.csv:
        w = csv.writer(sys.stdout)
        w.writerow(["file", "label", *names, "decision", "warnings", "out_of_distribution"])
        for r in results:
            probs = (f"{r['probabilities'][n]:.6f}" for n in names)
            ood = str(bool(r.get("out_of_distribution"))).lower()
            w.writerow([r["source"], r["label"], *probs, _decision_text(r), "; ".join(r["warnings"]), ood])
    else:
        _print_table(results, names)
    if failed:
        print(f"covidscan: {failed} file(s) could not be predicted", file=sys.stderr)
    return 1 if failed else 0


def _predict_studies(predictor, studies, args) -> int:
    """CT studies (series folders, NIfTI, zip): one line each (or JSON / CSV); per-study files with --study-out."""
    import csv

    from covidscan.data.volume import VolumeError, read_volume
    from covidscan.results import dumps
    from covidscan.study import predict_study, study_config, write_study

    failed, rows = 0, []
    cfg = study_config(predictor, args.study)
    for path in studies:
        try:
            vol = read_volume(path)
            res = predict_study(predictor, vol, cfg=cfg)
        except VolumeError as exc:
            failed += 1
            print(f"covidscan: error: {exc}", file=sys.stderr)
            continue
        rows.append(res.to_dict())
        if args.study_out:
            out = write_study(res, Path(args.study_out) / Path(str(path)).name.replace(".nii.gz", "").replace(".", "_"),
                              predictor=predictor, volume=vol)  # fmt: skip
            rows[-1]["outputs"] = str(out)
        if not (args.json or args.csv):
            print(res.line())
    if args.json:
        print(dumps(rows, indent=2))
    elif args.csv and rows:
        w = csv.DictWriter(sys.stdout, fieldnames=[k for k in rows[0] if k != "warnings"] + ["warnings"], extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "warnings": "; ".join(r["warnings"])})
    return failed


def cmd_explain(args) -> int:
    from covidscan.data import read_image
    from covidscan.explain import low_probability_warning, save_overlay
    from covidscan.inference import Predictor

    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device)
    scan = read_image(args.image)
    cam, cls = predictor.explain(scan, args.target, method=args.method)
    pred = predictor.predict_scan(scan, str(args.image))
    title = f"Grad-CAM for {cls} (p={pred.probabilities[cls]:.2f}); predicted {pred.label}"
    warning = low_probability_warning(cls, pred.probabilities[cls])
    if warning:
        print(f"covidscan: warning: {args.image}: {warning}", file=sys.stderr)
    save_overlay(args.out, scan.pixels, cam, title)
    print(f"{title}\nwrote {args.out}")
    return 0


def cmd_serve(args) -> int:
    import uvicorn

    from covidscan.errors import CLIError
    from covidscan.inference import Predictor
    from covidscan.serve import create_app

    if args.max_upload_mb <= 0:
        raise CLIError(f"--max-upload-mb {args.max_upload_mb}: must be a positive number of megabytes")
    token = args.token or os.environ.get("COVIDSCAN_TOKEN") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not token:
        raise CLIError(
            f"--host {args.host} makes the service reachable from other machines: set a token "
            "(--token TOKEN or COVIDSCAN_TOKEN) so that only holders of it can use it"
        )
    if args.max_pending < 1:
        raise CLIError(f"--max-pending {args.max_pending}: at least 1 (with fewer every prediction would be refused)")
    if args.max_study_mb <= 0:
        raise CLIError(f"--max-study-mb {args.max_study_mb}: must be a positive number of megabytes")
    if args.checkpoint is None:  # neither --checkpoint nor --model: the recommended X-ray model of the zoo
        from covidscan.zoo import DEFAULT_MODEL, checkpoint_path

        args.checkpoint = checkpoint_path(DEFAULT_MODEL["xray"])
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, backend=args.backend)
    if args.max_study_mb <= 0:
        raise CLIError(f"--max-study-mb {args.max_study_mb}: must be a positive number of megabytes")
    app = create_app(
        predictor, max_upload_bytes=args.max_upload_mb * 1024 * 1024, max_pending=args.max_pending, token=token,
        max_study_bytes=args.max_study_mb * 1024 * 1024, body_timeout=args.body_timeout,
    )  # fmt: skip
    from covidscan.serve.protocol import header_timeout_protocol

    uvicorn.run(app, host=args.host, port=args.port, log_level="info", http=header_timeout_protocol(args.header_timeout))
    return 0


def cmd_export(args) -> int:
    from covidscan.export import export_checkpoint

    diff = export_checkpoint(args.checkpoint, args.onnx, opset=args.opset)
    print(f"wrote {args.onnx}; max |onnxruntime - pytorch| = {diff:.2e} on a random batch")
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
    print(f"threshold for {t['class']}: {t['value']:.4f} (95% interval over resampled patients {lo:.4f} to {hi:.4f})")
    print(f"  sensitivity {fmt_interval(t['sensitivity'], t['sensitivity_ci95'])} % of {t['positives']} positives")
    print(f"  specificity {fmt_interval(t['specificity'], t['specificity_ci95'])} % of {t['negatives']} negatives")
    print(f"  on {t['data']}; {t['overlap']['summary']}")
    for w in t["warnings"]:
        print(f"  warning: {w}")
    print(f"wrote {args.out}")
    return 0


def cmd_adapt(args) -> int:
    from covidscan.adapt import adapt
    from covidscan.data.packed import is_packed

    images = args.images if any(is_packed(p) for p in args.images) else expand_paths(args.images)
    meta = adapt(args.checkpoint, images, args.out, device=args.device)
    print(f"BatchNorm statistics re-estimated on {meta.adaptation['images']} image(s); wrote {args.out}")
    return 0


def cmd_models(args) -> int:
    from covidscan.results import dumps
    from covidscan.zoo import list_models, models_table

    models = list_models()
    if args.json:
        print(dumps([{k: v for k, v in vars(m).items() if k != "folder"} | {"card": str(m.card_path)} for m in models], indent=2))
    else:
        print(models_table(models))
    return 0


def cmd_ensemble(args) -> int:
    from covidscan.ensemble import make_ensemble

    meta = make_ensemble(args.checkpoints, args.out)
    print(f"{meta.extra['description']}; wrote {args.out}")
    return 0


def _study_arg(p) -> None:
    p.add_argument(
        "--study", action="append", default=[], metavar="KEY=VALUE",
        help="CT studies: override the checkpoint's study settings, e.g. window_center=-650, frame=lungs, rule=max",
    )  # fmt: skip


def _subset_args(p) -> None:
    p.add_argument("--split", type=Path, help="split CSV; evaluates its --subset")
    p.add_argument("--subset", choices=["train", "val", "test"], default="test")


def _backend_arg(p) -> None:
    p.add_argument(
        "--backend", choices=["torch", "onnxruntime"], default="torch",
        help="onnxruntime: the forward pass as the exported ONNX graph on the CPU (2.8x faster for DenseNet121, "
        "same probabilities; a few seconds to export at start; needs onnx + onnxruntime)",
    )  # fmt: skip


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="metrics with 95 percent CIs, calibration, ROC, report.md (internal or external data)")
    common.add_checkpoint(p)
    common.add_data(
        p, positional=False, required=False,
        help_extra=": evaluated in full; the report says how many of them the model trained or validated on "
        "(external only when none)",
    )  # fmt: skip
    _subset_args(p)
    common.add_out(p, "folder for report.md, metrics.json, predictions.csv and figures")
    p.add_argument("--grid", type=int, default=0, help="also draw N test scans with file names and predictions, mistakes first")
    p.add_argument("--grid-random", action="store_true", help="draw the grid's scans at random (the paper's Fig. 8/9)")
    _study_arg(p)
    p.add_argument("--tta", action="store_true", help="test-time augmentation: average each image with its mirror image")
    p.add_argument(
        "--by", action="append", default=[], metavar="FIELD",
        help="also report subgroups by a manifest field: source, or a column / source_label entry such as view (repeatable)",
    )  # fmt: skip
    common.add_bootstrap(p, 1000)
    common.add_device(p)
    common.add_quiet(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "predict", help="class probabilities for image files / folders (PNG, JPEG, DICOM); CT models: one result per study"
    )
    common.add_checkpoint(p)
    p.add_argument(
        "paths", type=Path, nargs="+",
        help="image files or folders; with a CT model, a DICOM series folder, .nii / .nii.gz or .zip is one study",
    )  # fmt: skip
    g = p.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true", help="strict JSON, one object per image")
    g.add_argument("--csv", action="store_true", help="CSV with a header")
    p.add_argument("--tta", action="store_true", help="test-time augmentation: average each image with its mirror image")
    p.add_argument("--study-out", type=Path, help="CT studies: write slices.csv, slices.png and montage.png per study here")
    _study_arg(p)
    common.add_device(p)
    _backend_arg(p)
    common.add_quiet(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("explain", help="Grad-CAM overlay for the predicted (or --class) class")
    common.add_checkpoint(p)
    p.add_argument("image", type=Path)
    common.add_out(p, "PNG to write")
    p.add_argument("--class", dest="target", help="class to explain (default: the predicted one)")
    p.add_argument("--method", choices=["gradcam", "gradcam++"], default="gradcam", help="Grad-CAM or Grad-CAM++")
    common.add_device(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser(
        "serve", help="web API and upload page (FastAPI); with neither --checkpoint nor --model: the zoo's xray model"
    )
    common.add_checkpoint(p, required=False)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=int, default=20, help="largest accepted upload in megabytes (positive)")
    p.add_argument("--max-study-mb", type=int, default=300, help="CT models: largest zipped series / NIfTI upload in megabytes")
    p.add_argument("--body-timeout", type=float, default=30.0, help="seconds an upload may stall before 408")
    p.add_argument("--header-timeout", type=float, default=10.0, help="seconds a client has to send its request headers")
    p.add_argument("--max-pending", type=int, default=8, help="predictions running or waiting at once; more get 503")
    p.add_argument(
        "--token", help="require this token (Authorization: Bearer TOKEN); needed beyond localhost (or COVIDSCAN_TOKEN)"
    )
    common.add_device(p)
    _backend_arg(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="ONNX export, checked against PyTorch with onnxruntime")
    common.add_checkpoint(p)
    p.add_argument("--onnx", type=Path, required=True, help="ONNX file to write")
    p.add_argument("--opset", type=int, default=17)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("probe", help="shortcut probe: accuracy with the lungs masked out, and with only the lungs")
    common.add_checkpoint(p)
    common.add_data(p, positional=False, required=False)
    _subset_args(p)
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
        "images", type=Path, nargs="+", help="image files or folders of the new site, or one packed folder (no labels needed)"
    )
    common.add_out(p, "checkpoint to write: the adapted model")
    common.add_device(p)
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("ensemble", help="average several checkpoints' probabilities; writes one checkpoint")
    p.add_argument(
        "checkpoints", type=Path, nargs="+", help="member checkpoints (same task and preprocessing; input sizes may differ)"
    )
    common.add_out(p, "ensemble checkpoint to write")
    p.set_defaults(func=cmd_ensemble)

    p = sub.add_parser("summary", help="layer table (output shapes, parameters) and a block diagram (paper Figs. 6/7)")
    common.add_config(p)
    common.add_set(p)
    p.add_argument("--checkpoint", type=Path, help="summarise a trained checkpoint instead of a recipe")
    p.add_argument("--model", metavar="NAME", help="summarise a model of the zoo (covidscan models)")
    p.add_argument("--depth", type=int, default=2, help="nesting depth of the layer table")
    p.add_argument("--diagram", type=Path, help="also draw the stages and head to this PNG")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("models", help="the zoo: ready trained models (name, task, architectures, size, figures)")
    p.add_argument("--json", action="store_true", help="strict JSON instead of a table")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("card", help="model card (markdown) for a checkpoint")
    common.add_checkpoint(p)
    p.add_argument("--metrics", type=Path, help="metrics.json from covidscan evaluate")
    p.add_argument("--probe", type=Path, help="probe.json from covidscan probe --out")
    common.add_out(p, "markdown file to write (default: print)", required=False)
    p.set_defaults(func=cmd_card)

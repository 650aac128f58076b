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


def _expand(paths: list[Path]) -> list[Path]:
    from covidscan.data.io import is_image_file

    out = []
    for p in paths:
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".") and is_image_file(f))
        else:
            out.append(p)
    return out


def cmd_predict(args) -> int:
    import csv
    import json
    import sys

    from covidscan.data.io import ImageReadError
    from covidscan.inference import Predictor

    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device)
    names = predictor.class_names
    results, failed = [], 0
    for path in _expand(args.paths):
        try:
            pred = predictor.predict(path)
        except (ImageReadError, FileNotFoundError) as exc:
            failed += 1
            print(f"covidscan: error: {exc}", file=sys.stderr)
            continue
        for w in pred.warnings:
            print(f"covidscan: warning: {path}: {w}", file=sys.stderr)
        results.append(pred.to_dict())
    if args.json:
        print(json.dumps(results, indent=2))
    elif args.csv:
        w = csv.writer(sys.stdout)
        w.writerow(["file", "label", *names, "warnings"])
        for r in results:
            w.writerow([r["source"], r["label"], *(f"{r['probabilities'][n]:.6f}" for n in names), "; ".join(r["warnings"])])
    else:
        width = max([len(r["source"]) for r in results] + [4])
        print(f"{'file':<{width}}  {'label':<10} " + " ".join(f"{n:>10}" for n in names))
        for r in results:
            print(f"{r['source']:<{width}}  {r['label']:<10} " + " ".join(f"{r['probabilities'][n]:>10.4f}" for n in names))
    if failed:
        print(f"covidscan: {failed} file(s) could not be predicted", file=sys.stderr)
    return 1 if failed else 0


def cmd_explain(args) -> int:
    from covidscan.data import read_image
    from covidscan.explain import save_overlay
    from covidscan.inference import Predictor

    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device)
    scan = read_image(args.image)
    cam, cls = predictor.explain(scan, args.target)
    pred = predictor.predict_scan(scan, str(args.image))
    title = f"Grad-CAM for {cls} (p={pred.probabilities[cls]:.2f}); predicted {pred.label}"
    save_overlay(args.out, scan.pixels, cam, title)
    print(f"{title}\nwrote {args.out}")
    return 0


def cmd_serve(args) -> int:
    import uvicorn

    from covidscan.inference import Predictor
    from covidscan.serve import create_app

    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device)
    app = create_app(predictor, max_upload_bytes=args.max_upload_mb * 1024 * 1024)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def cmd_export(args) -> int:
    from covidscan.export import export_checkpoint

    diff = export_checkpoint(args.checkpoint, args.onnx, opset=args.opset)
    print(f"wrote {args.onnx}; max |onnxruntime - pytorch| = {diff:.2e} on a random batch")
    return 0


def cmd_probe(args) -> int:
    import json

    from covidscan.probe import probe, probe_markdown

    r = probe(args.checkpoint, args.data, split_file=args.split, subset=args.subset)
    md = probe_markdown(r)
    print(md)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "probe.md").write_text(md)
        (args.out / "probe.json").write_text(json.dumps(r, indent=2))
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


def cmd_loso(args) -> int:
    from covidscan.config import load_config
    from covidscan.loso import leave_one_source_out

    cfg = load_config(args.config, args.set)
    leave_one_source_out(
        cfg, args.data, args.out, sources=args.sources, n_boot=args.bootstrap, progress=not args.quiet, resume=args.resume
    )
    print((Path(args.out) / "loso.md").read_text())
    return 0


def register(sub) -> None:
    p = sub.add_parser("loso", help="leave-one-source-out: train on all sources but one, test on the one left out")
    p.add_argument("--config", type=Path)
    p.add_argument("--data", type=Path, nargs="+", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sources", nargs="+", help="only these left-out sources (default: each in turn)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--bootstrap", type=int, default=500)
    p.add_argument("--resume", action="store_true", help="keep folds that already finished in --out (same config)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_loso)

    p = sub.add_parser("probe", help="shortcut probe: accuracy with the lungs masked out, and with only the lungs")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--data", type=Path, nargs="+")
    p.add_argument("--split", type=Path)
    p.add_argument("--subset", choices=["train", "val", "test"], default="test")
    p.add_argument("--out", type=Path, help="folder for probe.md / probe.json")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("card", help="model card (markdown) for a checkpoint")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--metrics", type=Path, help="metrics.json from covidscan evaluate")
    p.add_argument("--probe", type=Path, help="probe.json from covidscan probe --out")
    p.add_argument("--out", type=Path)
    p.set_defaults(func=cmd_card)

    p = sub.add_parser("predict", help="class probabilities for image files / folders (PNG, JPEG, DICOM)")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("paths", type=Path, nargs="+")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true")
    g.add_argument("--csv", action="store_true")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("explain", help="Grad-CAM overlay for the predicted (or --class) class")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("image", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--class", dest="target", help="class to explain (default: the predicted one)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("serve", help="web API and upload page (FastAPI)")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=int, default=20)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="ONNX export, checked against PyTorch with onnxruntime")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--onnx", type=Path, required=True)
    p.add_argument("--opset", type=int, default=17)
    p.set_defaults(func=cmd_export)

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

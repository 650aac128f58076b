"""Commands that use a model on scans: predict, explain, models."""

from __future__ import annotations

import sys
from pathlib import Path

import covidscan.cli.common as common

BATCH = 8  # files decoded and run through the model together


def predict_files(predictor, files: list[Path], *, quiet: bool = False) -> list:
    """A :class:`~covidscan.inference.Prediction` per file, or a :class:`~covidscan.cli.output.FileError` for a
    file that could not be read: one bad file keeps its row and never costs the others. Files are decoded,
    then run through the model ``BATCH`` at a time (the Predictor's batched path)."""
    from covidscan.cli.output import FileError
    from covidscan.data.io import read_image
    from covidscan.errors import CovidscanError

    bar = None
    if len(files) > 1 and not quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(files), unit="img", desc="predict", file=sys.stderr, leave=False)
    items: list = []
    for start in range(0, len(files), BATCH):
        scans, slots = [], []
        for path in files[start : start + BATCH]:
            try:
                scans.append(read_image(path))
                slots.append(len(items))
                items.append(None)
            except (CovidscanError, FileNotFoundError, OSError, ValueError) as exc:
                items.append(FileError(str(path), str(exc)))
                print(f"covidscan: error: {exc}", file=sys.stderr)
        for k, pred in zip(slots, predictor.predict(scans) if scans else []):
            items[k] = pred
        if bar is not None:
            bar.update(len(files[start : start + BATCH]))
    if bar is not None:
        bar.close()
    return items


def predict_studies(predictor, studies: list[Path], args) -> tuple[list, int]:
    """CT studies (series folders, NIfTI, zip): a :class:`~covidscan.study.StudyResult` each; the per-study
    files with ``--study-out``. Returns the results and how many studies failed."""
    from covidscan.data.volume import VolumeError, read_volume
    from covidscan.study import predict_study, study_config
    from covidscan.study_files import write_study

    cfg = study_config(predictor, args.study)
    results, outputs, failed = [], {}, 0
    for path in studies:
        try:
            vol = read_volume(path)
            res = predict_study(predictor, vol, cfg=cfg)
        except VolumeError as exc:
            failed += 1
            print(f"covidscan: error: {exc}", file=sys.stderr)
            continue
        results.append(res)
        if args.study_out:
            folder = Path(args.study_out) / Path(str(path)).name.replace(".nii.gz", "").replace(".", "_")
            outputs[res.study] = str(write_study(res, folder, predictor=predictor, volume=vol))
    return results, outputs, failed


def cmd_predict(args) -> int:
    from covidscan.cli.output import FileError, print_table, write_csv, write_json, write_studies
    from covidscan.data.io import expand_paths
    from covidscan.inference import Predictor

    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, tta=args.tta, backend=args.backend)
    fmt = "json" if args.json else "csv" if args.csv else "table"
    failed, files = 0, None
    if predictor.task == "ct":
        from covidscan.study import find_studies

        studies, files = find_studies(args.paths)
        results, outputs, failed = predict_studies(predictor, studies, args)
        write_studies(results, fmt, outputs)
        if studies and not files:
            return 1 if failed else 0
    items = predict_files(predictor, expand_paths(args.paths) if files is None else files, quiet=args.quiet)
    if fmt == "json":
        write_json(items)
    elif fmt == "csv":
        write_csv(items, predictor.class_names)
    else:
        print_table(items, predictor.class_names)
    failed += sum(isinstance(i, FileError) for i in items)
    if failed:
        print(f"covidscan: {failed} file(s) could not be predicted", file=sys.stderr)
    return 1 if failed else 0


def cmd_explain(args) -> int:
    from covidscan.data import read_image
    from covidscan.errors import CLIError
    from covidscan.explain import METHOD_NAMES, low_probability_warning, save_overlay
    from covidscan.inference import Predictor

    if Path(args.image).is_dir():
        raise CLIError(
            f"{args.image} is a folder: explain takes one image file; for a CT study's slices with their heat maps use "
            "covidscan predict --study-out DIR"
        )
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device)
    scan = read_image(args.image)
    cam, cls = predictor.explain(scan, args.target, method=args.method)
    pred = predictor.predict_scan(scan, str(args.image))
    title = f"{METHOD_NAMES[args.method]} for {cls} (p={pred.probabilities[cls]:.2f}); predicted {pred.label}"
    warning = low_probability_warning(cls, pred.probabilities[cls])
    for w in ([warning] if warning else []) + pred.warnings:
        print(f"covidscan: warning: {args.image}: {w}", file=sys.stderr)
    save_overlay(args.out, scan.pixels, cam, title, method=args.method)
    print(f"{title}\nwrote {args.out}")
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


def register(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="class probabilities for image files / folders (PNG, JPEG, DICOM); CT models: one result per study",
        description="Example: covidscan predict --model xray scans/ --csv > predictions.csv",
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
    common.add_study(p)
    common.add_device(p)
    common.add_backend(p)
    common.add_quiet(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "explain",
        help="Grad-CAM overlay for the predicted (or --class) class",
        description="Example: covidscan explain --model xray film.png --out cam.png --method gradcam++",
    )
    common.add_checkpoint(p)
    p.add_argument("image", type=Path, help="one image file (PNG, JPEG or DICOM)")
    common.add_out(p, "PNG to write: the scan and its heat map side by side")
    p.add_argument("--class", dest="target", help="class to explain (default: the predicted one)")
    p.add_argument("--method", choices=["gradcam", "gradcam++"], default="gradcam", help="Grad-CAM or Grad-CAM++")
    common.add_device(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser(
        "models",
        help="the zoo: ready trained models (name, task, architectures, size, figures)",
        description="Example: covidscan models; then covidscan predict --model xray SCAN",
    )
    p.add_argument("--json", action="store_true", help="strict JSON instead of a table")
    p.set_defaults(func=cmd_models)

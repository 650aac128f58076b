"""``stats``, ``split`` and ``pack``: dataset commands (only ``pack`` loads torch)."""

from __future__ import annotations

import logging
from pathlib import Path

import covidscan.cli.common as common
from covidscan.errors import CLIError

logger = logging.getLogger("covidscan")


def cmd_stats(args) -> int:
    from covidscan.data import compute_stats, format_stats, load_dataset
    from covidscan.data.volume import format_volume_stats, is_studies_folder, is_volume_path, study_paths, volume_stats
    from covidscan.results import dumps

    data = args.data if isinstance(args.data, list) else [args.data]
    if len(data) == 1 and (is_studies_folder(data[0]) or is_volume_path(data[0])):  # CT studies: per-volume facts
        rows = volume_stats(study_paths(data[0]))
        print(dumps(rows, indent=2) if args.json else format_volume_stats(rows))
        return 0
    index = load_dataset(args.data, args.task)
    stats = compute_stats(index, original=args.original, strict=args.strict)
    print(dumps(stats.to_dict(), indent=2) if args.json else format_stats(stats))
    if len(index.origins) > 1 or len({r.source for r in index.records}) > 1:
        for label in index.single_source_classes():
            logger.warning("class %r comes from a single source: a model may learn the source, not the class", label)
    return 0


def cmd_split(args) -> int:
    from covidscan.data import grouped_split, load_dataset, paper_split, write_split

    index = load_dataset(args.data, args.task)
    fn = paper_split if args.protocol == "paper" else grouped_split
    split = fn(index, test=args.test, val=args.val, seed=args.seed)
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


def cmd_verify_packs(folders) -> int:
    """``covidscan pack --verify PACKED...``: read every row of each pack against its checksum."""
    from covidscan.data.packed import read_packed

    bad_total = 0
    for folder in folders:
        _, images = read_packed(folder)
        bad = images.verify()
        bad_total += len(bad)
        print(
            f"{folder}: {len(images)} images, "
            + (f"{len(bad)} damaged (rows {bad[:10]})" if bad else "every row matches its checksum")
        )
    return 1 if bad_total else 0


def cmd_pack(args) -> int:
    from covidscan.config import load_config
    from covidscan.data.pack import pack
    from covidscan.data.transforms import Preprocess
    from covidscan.models import get_backbone

    if args.verify:
        return cmd_verify_packs(args.data)
    if args.out is None:
        raise CLIError("pack: --out PACKED is needed (or --verify to check existing packs)")

    sets = [*args.set, *([f"data.image_size={args.size}"] if args.size else [])]
    cfg = load_config(args.config, sets)
    pre = Preprocess.from_config(get_backbone(cfg.model.backbone), cfg.data, cfg.study)
    result = pack(
        args.data, args.out, pre, task=args.task or (cfg.data.task if args.config else None), shard_images=args.shard_images, workers=args.workers,
        progress=not args.quiet, overwrite=args.overwrite,
    )  # fmt: skip
    for path, reason in result.skipped[:10]:
        logger.warning("skipped %s: %s", path, reason)
    if len(result.skipped) > 10:
        logger.warning("... and %d more unreadable image(s): see %s", len(result.skipped) - 10, result.out / "skipped.csv")
    print(
        f"packed {result.images} images ({pre.image_size} px, preprocessing {pre.cache_key()}) into {result.out}: "
        f"{result.bytes / 2**20:.0f} MiB, {result.seconds:.0f} s, {result.images_per_s:.0f} images/s"
        + (f"; {len(result.skipped)} unreadable skipped" if result.skipped else "")
    )
    return 0


def cmd_study_slices(args) -> int:
    from covidscan.config import load_config
    from covidscan.study import export_slices

    cfg = load_config(args.config, args.set)
    if args.out.exists() and any(args.out.iterdir()):
        raise CLIError(f"{args.out} exists and is not empty; choose another --out")
    counts = export_slices(args.studies, args.out, cfg=cfg.study, source=args.source)
    print(
        f"wrote {counts['covid'] + counts['normal']} lung slices ({counts['covid']} covid, {counts['normal']} normal; "
        f"{counts['left_out_clear_covid']} clear slices of COVID studies left out) and manifest.csv to {args.out}"
    )
    return 0


def register(sub) -> None:
    p = sub.add_parser("stats", help="per-class image counts and resolution statistics (paper Tables I/II)")
    common.add_data(p)
    common.add_task(p)
    p.add_argument("--json", action="store_true", help="machine-readable output (strict JSON)")
    p.add_argument("--original", action="store_true", help="use the manifest's original_width/height")
    p.add_argument("--strict", action="store_true", help="fail on the first unreadable image instead of skipping")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("split", help="leak-free train/val/test split written as a manifest with a split column")
    common.add_data(p)
    common.add_task(p)
    p.add_argument("--out", type=Path, required=True, help="split CSV to write")
    p.add_argument("--test", type=float, default=0.2, help="fraction of images (whole groups) for test")
    p.add_argument("--val", type=float, default=0.1, help="fraction for validation")
    p.add_argument("--seed", type=int, default=0, help="random seed of the split (default 0)")
    p.add_argument(
        "--protocol",
        choices=["grouped", "paper"],
        default="grouped",
        help="grouped (default, patient-level) or paper (image-level 80/20 as Berrimi et al.)",
    )
    p.set_defaults(func=cmd_split)

    p = sub.add_parser(
        "pack", help="decode and preprocess a dataset once into shards streamed by train / evaluate / loso (large datasets)"
    )
    common.add_data(p)
    common.add_task(p)
    common.add_out(p, "packed folder to write (give it as --data to train, evaluate or loso)", required=False)
    p.add_argument(
        "--verify", action="store_true", help="check every row of the packed folder(s) given as DATA against its checksum"
    )
    common.add_config(p)
    common.add_set(p)
    p.add_argument(
        "--size", type=int, default=0, help="image side in pixels (default: the config's data.image_size, else the backbone's)"
    )
    p.add_argument("--shard-images", type=int, default=4096, help="images per shard file")
    p.add_argument("--workers", type=int, default=None, help="decoding threads (default: cores, at most 8)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing packed folder")
    common.add_quiet(p)
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser(
        "study-slices",
        help="CT studies -> a slice dataset (windowed lung slices as PNG + manifest.csv, grouped by study) to train or test on",
    )
    p.add_argument("studies", type=Path, help="a folder of studies with manifest.csv (series,label[,task_label]) like ct-volumes")
    common.add_out(p, "folder to write <label>/*.png and manifest.csv")
    common.add_config(p)
    common.add_set(p)
    p.add_argument("--source", default="", help="source name for the manifest (default: the manifest's, else the folder's)")
    p.set_defaults(func=cmd_study_slices)

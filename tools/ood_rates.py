"""How often each out-of-distribution check fires: on a model's own test split (it must stay small) and on the
other modality (it must be large); for a CT model also the no-lung check on real DICOM slices.

    python tools/ood_rates.py --xray runs/recommended/best.pt --ct runs/ct/best.pt [--out docs/results/ood.md]

Each model's test images are its run's ``split.csv`` test subset; the other modality is every image of
``../shared/data/ct`` (for the X-ray model) or of ``../shared/data/xray`` (for the CT model). The no-lung check
is read on every slice of the three ``ct-volumes`` series, against the slices whose lung area (from Hounsfield
units) is under 1% of the slice.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def flag_rates(predictor, images: list) -> dict:
    """Fraction of ``images`` (ScanImage) each check flags: mean appearance, nearest training scan, either."""
    from covidscan.appearance import appearance_correlation, nearest_training_correlation
    from covidscan.data.transforms import to_gray_uint8

    ref = predictor.meta.reference
    mean_f, near_f = [], []
    for scan in images:
        u8 = to_gray_uint8(scan, predictor.pre)
        mean_f.append(appearance_correlation(u8, ref) < ref["corr_p01"])
        near_f.append(
            predictor._train_unit is not None and nearest_training_correlation(u8, predictor._train_unit) < ref["nn_threshold"]
        )
    m, n = np.asarray(mean_f), np.asarray(near_f)
    return {"n": len(images), "mean": float(m.mean()), "nearest": float(n.mean()), "either": float((m | n).mean())}


def read_all(records) -> list:
    from covidscan.data.io import read_image
    from covidscan.errors import ImageReadError

    out = []
    for r in records:
        try:
            out.append(read_image(r.path))
        except ImageReadError:
            pass
    return out


def test_images(checkpoint: Path) -> list:
    from covidscan.data import read_split

    return read_all(read_split(checkpoint.parent / "split.csv").subset("test").records)


def no_lung_rates(predictor) -> dict:
    from covidscan.data.hounsfield import MIN_LUNG_PIXELS, lung_fraction
    from covidscan.data.io import read_image

    flagged, truth = [], []
    for series in sorted((SHARED / "ct-volumes").glob("*/*")):
        for f in sorted(series.glob("*.dcm")):
            scan = read_image(f)
            truth.append(lung_fraction(scan.hu) < MIN_LUNG_PIXELS)
            flagged.append(any(w.startswith("no lung") for w in predictor.check(scan)))
    t, f = np.asarray(truth), np.asarray(flagged)
    return {"slices": len(t), "no_lung_slices": int(t.sum()), "flagged_of_no_lung": float(f[t].mean()) if t.any() else None,
            "flagged_of_lung": float(f[~t].mean())}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--xray", type=Path, required=True, help="an X-ray checkpoint with its run's split.csv beside it")
    ap.add_argument("--ct", type=Path, required=True, help="a CT checkpoint with its run's split.csv beside it")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from covidscan.data import load_dataset
    from covidscan.inference import Predictor

    lines = [
        "| model | images | n | mean appearance | nearest training scan | either (what warns) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for task, ckpt, other in (("xray", args.xray, SHARED / "ct"), ("ct", args.ct, SHARED / "xray")):
        p = Predictor.from_checkpoint(ckpt, device="cpu")
        own = flag_rates(p, test_images(ckpt))
        oth = flag_rates(p, read_all(load_dataset(other).records))
        for what, r in ((f"its own test split ({task})", own), (f"all of {other.name} (the other modality)", oth)):
            lines.append(f"| {task} | {what} | {r['n']} | {r['mean']:.1%} | {r['nearest']:.1%} | **{r['either']:.1%}** |")
        if task == "ct":
            nl = no_lung_rates(p)
    lines += ["", f"No-lung check of the CT model on the {nl['slices']} DICOM slices of the three ct-volumes series: "
              f"{nl['flagged_of_no_lung']:.0%} of the {nl['no_lung_slices']} slices with under 1% lung flagged, "
              f"{nl['flagged_of_lung']:.1%} of the others."]  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()

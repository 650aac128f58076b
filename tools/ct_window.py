"""Which lung window makes real CT series look like the Soares training slices?

    python benchmarks/ct_window.py [--out docs/results/ct_window.png]

The Soares et al. slices (../shared/data/ct) are 8-bit screenshots in an unknown lung window. For
candidate windows (centre, width), the COVID-CT-MD series in ../shared/data/ct-volumes are windowed and
framed as covidscan.study does, and the grey-level histogram of their lung slices is compared with that
of the Soares slices (Wasserstein-1 distance between the two grey-level distributions, in grey levels).
Prints the table; saves a figure with example slices and the histograms of the default and best windows.
"""

from __future__ import annotations

import argparse
import glob
import random
from pathlib import Path

import numpy as np
from PIL import Image

from covidscan.config import StudyConfig
from covidscan.data.volume import read_volume
from covidscan.study import lung_areas, select_slices, slice_image

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def hist(images) -> np.ndarray:
    h = sum(np.bincount(np.asarray(im, np.uint8).ravel(), minlength=256) for im in images).astype(np.float64)
    return h / h.sum()


def w1(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.abs(np.cumsum(p) - np.cumsum(q)).sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("docs/results/ct_window.png"))
    ap.add_argument("--soares", type=int, default=300, help="Soares slices sampled (seeded)")
    args = ap.parse_args()
    files = sorted(glob.glob(str(SHARED / "ct" / "*" / "*.jpg")))
    random.Random(0).shuffle(files)
    soares = [np.array(Image.open(f).convert("L")) for f in files[: args.soares]]
    h_soares = hist(soares)
    vols = [read_volume(p) for p in sorted(glob.glob(str(SHARED / "ct-volumes" / "*" / "*"))) if Path(p).is_dir()]
    kept = [(v, np.flatnonzero(select_slices(lung_areas(v), StudyConfig().min_lung))) for v in vols]
    rows = []
    for c in (-700, -650, -600, -550, -500, -450, -400):
        for w in (1000, 1200, 1500, 1800, 2000):
            cfg = StudyConfig(window_center=c, window_width=w)
            imgs = [slice_image(v.hu[i], cfg) for v, idx in kept for i in idx[::3]]
            rows.append((w1(hist(imgs), h_soares), c, w))
    rows.sort()
    print("| centre | width | W1 to Soares (grey levels) |\n|---|---|---|")
    for d, c, w in rows[:8]:
        print(f"| {c} | {w} | {d:.1f} |")
    default = next(r for r in rows if r[1:] == (-600, 1500))
    print(f"default (-600, 1500): {default[0]:.1f}; best ({rows[0][1]}, {rows[0][2]}): {rows[0][0]:.1f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(14, 6.5))
    for a, im in zip(axes[0, :2], soares[:2]):
        a.imshow(im, cmap="gray", vmin=0, vmax=255)
        a.set_title("Soares (training) slice", fontsize=9)
        a.axis("off")
    v, idx = kept[0]
    mid = idx[len(idx) // 2]
    for a, (_d, c, w) in zip(axes[0, 2:], [default, rows[0]]):
        a.imshow(slice_image(v.hu[mid], StudyConfig(window_center=c, window_width=w)), cmap="gray", vmin=0, vmax=255)
        a.set_title(f"COVID-CT-MD, window {c}/{w}", fontsize=9)
        a.axis("off")
    ax = plt.subplot2grid((2, 4), (1, 0), colspan=4, fig=fig)
    for a in axes[1]:
        a.remove()
    x = np.arange(256)
    ax.plot(x, h_soares, label="Soares training slices", lw=2)
    for d, c, w in [default, rows[0]]:
        cfg = StudyConfig(window_center=c, window_width=w)
        ax.plot(
            x, hist([slice_image(v.hu[i], cfg) for v, ix in kept for i in ix[::3]]), label=f"COVID-CT-MD {c}/{w} (W1 {d:.1f})"
        )
    ax.set(xlabel="grey level", ylabel="fraction of pixels", yscale="log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()

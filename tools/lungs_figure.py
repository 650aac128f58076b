"""Check by eye and speed of the lung segmenter: films from every shipped X-ray source with the
predicted lung outline (and the held-out OpenIST films with their hand-drawn masks), plus the
time per image on this CPU.

    python benchmarks/lungs_figure.py --data ../shared/data --out docs/results/lungs.png [--weights runs/lungs/lungseg_unet128.pt]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from covidscan.data import load_dataset, read_image  # noqa: E402
from covidscan.data.lungs import load_segmenter, lung_bbox, segment_lungs  # noqa: E402
from covidscan.data.transforms import gray  # noqa: E402
from covidscan.experiments.loso import source_key  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, default=Path("docs/results/lungs.png"))
    ap.add_argument("--weights", type=Path, help="segmenter file (default: the one shipped in the package)")
    ap.add_argument("--per-source", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, info = load_segmenter(args.weights)
    index = load_dataset([args.data / "xray", args.data / "xray-extra", args.data / "xray-lungs"], "xray")
    by_source = defaultdict(list)
    for r in index.records:
        by_source[source_key(r.source)].append(r)
    rng = np.random.default_rng(0)
    picks = [(s, rec) for s, recs in sorted(by_source.items()) for rec in rng.choice(recs, size=args.per_source, replace=False)]
    cols = args.per_source
    fig, axes = plt.subplots(len(by_source), cols, figsize=(2.6 * cols, 2.8 * len(by_source)), squeeze=False)
    times = []
    for k, (s, rec) in enumerate(picks):
        g = gray(read_image(rec.path).pixels)
        t0 = time.perf_counter()
        mask = segment_lungs(g, model)
        times.append(time.perf_counter() - t0)
        ax = axes[k // cols, k % cols]
        ax.imshow(g, cmap="gray", vmin=0, vmax=1)
        if mask.any():
            ax.contour(mask, levels=[0.5], colors="lime", linewidths=1.0)
            box = lung_bbox(mask)
            y0, y1, x0, x1 = box
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="yellow", lw=0.8, ls="--"))
        ax.set_title(f"{s} / {rec.label}\nlung {mask.mean():.0%} of image", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    dice = info.get("dice_heldout_mean")
    fig.suptitle(
        f"learned lung masks (green) and crop box (yellow) on every shipped source; held-out Dice {dice:.3f}"
        if dice is not None
        else "learned lung masks",
        fontsize=10,
    )
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    ms = np.median(times[1:] if len(times) > 1 else times) * 1000
    print(
        f"wrote {args.out}; median {ms:.1f} ms per image (read excluded) over {len(times)} films, CPU threads {torch.get_num_threads()}"
    )


if __name__ == "__main__":
    main()

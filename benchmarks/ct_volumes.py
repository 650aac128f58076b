"""CT studies on the three COVID-CT-MD series in ../shared/data/ct-volumes: windows, rules, speed.

    python benchmarks/ct_volumes.py CHECKPOINT [--speed]

1. For each lung window, the slice-level AUROC (infected slices of the COVID patient against every
   scored slice of the CAP and normal patients; infected against clear slices inside the COVID patient)
   and each patient's study score under every aggregation rule.
2. ``--speed``: a study of about 150 slices (the COVID and CAP series stacked: 158 DICOM files, JPEG
   Lossless) read and scored, against a plain per-slice loop written the obvious way (pydicom per file,
   window, PIL resize, one forward pass per slice), in the same run; prints both and the ratio.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from covidscan.data.volume import Volume, read_volume
from covidscan.inference import Predictor
from covidscan.study import aggregate, predict_study, study_config
from covidscan.study_files import evaluate_studies

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct-volumes"
WINDOWS = [(-600, 1500), (-650, 1500), (-500, 1500), (-600, 1200), (-700, 1800), (-400, 1500)]


def windows_table(pred: Predictor) -> None:
    base = study_config(pred)
    print(
        "| window | slice AUROC infected vs non-COVID | infected vs clear (COVID patient) | "
        "P001 (covid) topk / mean / max | cap001 (CAP) topk / mean / max | normal001 topk / mean / max |"
    )
    print("|---|---|---|---|---|---|")
    for c, w in WINDOWS:
        cfg = replace(base, window_center=float(c), window_width=float(w))
        s = evaluate_studies(pred, SHARED, None, cfg=cfg, figures=False)
        cells = [
            " / ".join(f"{aggregate(st['scored_probabilities'], rule, cfg.top):.2f}" for rule in ("topk", "mean", "max"))
            for st in s["studies"]
        ]
        print(
            f"| {c} / {w} | {s['slice_auroc_infected_vs_noncovid']:.3f} | {s['slice_auroc_infected_vs_clear_in_covid']:.3f} | "
            + " | ".join(cells)
            + " |"
        )


def plain_study(pred: Predictor, files: list[Path]) -> float:
    """The obvious loop: read each file, sort by position, window, resize with PIL, one forward pass per slice."""
    import pydicom
    import torch
    from PIL import Image

    dss = sorted((pydicom.dcmread(f) for f in files), key=lambda d: float(d.ImagePositionPatient[2]))
    mean = torch.tensor(pred.pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pred.pre.std).view(1, 3, 1, 1)
    probs = []
    for ds in dss:
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        img = np.clip((hu + 1350) / 1500, 0, 1) * 255
        img = np.asarray(Image.fromarray(img.astype(np.uint8)).resize((pred.pre.image_size,) * 2, Image.BILINEAR))
        x = torch.from_numpy(img).float().div(255).expand(1, 3, -1, -1)
        with torch.no_grad():
            probs.append(pred.model((x - mean) / std).softmax(1)[0, 0].item())
    return float(np.mean(sorted(probs)[-len(probs) // 4 :]))


def speed(pred: Predictor) -> None:
    series = [SHARED / "covid" / "P001", SHARED / "cap" / "cap001"]
    files = [f for s in series for f in sorted(s.glob("*.dcm"))]
    t0 = time.perf_counter()
    vols = [read_volume(s) for s in series]
    t_read = time.perf_counter() - t0
    stacked = Volume(
        np.concatenate([v.hu for v in vols]),
        vols[0].spacing,
        np.concatenate([vols[0].positions, vols[1].positions + 1000]),
        vols[0].names + vols[1].names,
        "stacked",
    )
    t1 = time.perf_counter()
    res = predict_study(pred, stacked)
    t_score = time.perf_counter() - t1
    ours = t_read + t_score
    t2 = time.perf_counter()
    plain_study(pred, files)
    plain = time.perf_counter() - t2
    print(
        f"study of {stacked.n_slices} slices ({len(res.scored)} lung slices scored): read {t_read:.1f} s + "
        f"score {t_score:.1f} s = {ours:.1f} s (goal < 10 s) | plain per-slice loop (all slices, batch 1) {plain:.1f} s | "
        f"RATIO {plain / ours:.2f}x"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--speed", action="store_true")
    args = ap.parse_args()
    pred = Predictor.from_checkpoint(args.checkpoint, device="cpu")
    windows_table(pred)
    if args.speed:
        speed(pred)


if __name__ == "__main__":
    main()

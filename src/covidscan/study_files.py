"""What a CT study's result is written as: the probability plot along the body axis, the per-study folder of
``predict --study-out`` (CSV, JSON, plot, montage, and NIfTI volumes on the input's geometry) and the patient-level
report of ``evaluate`` on a studies folder. The scoring itself is :mod:`covidscan.study`'s."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from covidscan.config import StudyConfig
from covidscan.data.hounsfield import window
from covidscan.data.io import ScanImage
from covidscan.data.volume import Volume, read_volume
from covidscan.study import (
    UNDETERMINED,
    StudyResult,
    predict_study,
    read_studies,
    slice_boxes,
    slice_image,
    study_config,
    study_truth,
)


def plot_study(result: StudyResult, dest) -> None:
    """The COVID probability of each scored slice along the body axis, the study score as a line;
    ``dest``: a path or a binary file object (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result.scored
    # a small canvas with large type: the page shows it at phone width too (390 px) and it stays readable
    fig, ax = plt.subplots(figsize=(5, 2.8))
    ax.plot([r["position_mm"] for r in s], [r["probability"] for r in s], "o-", ms=3)
    if s and result.probability == result.probability:
        ax.axhline(result.probability, color="tab:red", ls="--", label=f"study ({result.rule}): {result.probability:.2f}")
        ax.legend(fontsize=10)
    ax.set_ylim(0, 1)
    ax.set_xlabel("slice position, feet -> head (mm)", fontsize=11)
    ax.set_ylabel(f"p({result.positive_class})", fontsize=11)
    ax.tick_params(labelsize=10)
    ax.set_title(Path(result.study).name, fontsize=11)
    fig.tight_layout()
    fig.savefig(dest, dpi=110, format="png")
    plt.close(fig)


def write_study(result: StudyResult, out, *, predictor=None, volume: Volume | None = None, montage: int = 6) -> Path:
    """``slices.csv``, ``study.json``, ``slices.png`` (probability along the body axis) and, with the predictor
    and volume, ``montage.png`` (the highest-scoring slices with Grad-CAM) and the two NIfTI volumes of
    :func:`write_volumes` (lung window and heat map, on the input's geometry) in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from covidscan.results import write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "slices.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(result.slices[0]))
        w.writeheader()
        w.writerows(result.slices)
    write_json(result.to_dict(), out / "study.json")
    s = result.scored
    plot_study(result, out / "slices.png")
    if predictor is not None and volume is not None and s:
        from covidscan.explain import overlay

        cfg = study_config(predictor)
        top = sorted(s, key=lambda r: -r["probability"])[:montage]
        fig, axes = plt.subplots(1, len(top), figsize=(2.6 * len(top), 2.9))
        for a, r in zip(np.atleast_1d(axes), top):
            img = slice_image(volume.hu[r["index"]], cfg, slice_boxes(volume, [r["index"]]).get(r["index"]))
            scan = ScanImage(pixels=img.astype(np.float32) / 255.0, format="CT", mode="HU", path=Path(r["name"]))
            cam, _ = predictor.explain(scan, result.positive_class)
            a.imshow(overlay(img.astype(np.float32) / 255.0, cam))
            a.set_title(f"slice {r['index']}  p={r['probability']:.2f}", fontsize=8)
            a.axis("off")
        fig.tight_layout()
        fig.savefig(out / "montage.png", dpi=90)
        plt.close(fig)
        write_volumes(result, out, predictor, volume)
    return out


def write_volumes(result: StudyResult, out, predictor, volume: Volume) -> tuple[Path, Path]:
    """``lung_window.nii.gz`` (the study in the model's lung window, uint8) and ``heatmap.nii.gz`` (Grad-CAM of
    the positive class on every scored slice, 0 to 1; 0 on the slices not scored), both on the input's geometry
    (:attr:`Volume.affine`), so they open over the scan in 3D Slicer or ITK-SNAP."""
    import nibabel as nib

    cfg = study_config(predictor)
    out = Path(out)
    grey = np.stack([window(v, cfg.window_center, cfg.window_width) for v in volume.hu])  # Z x H x W uint8
    heat = np.zeros(volume.hu.shape, np.float32)
    scored = [r["index"] for r in result.scored]
    boxes = slice_boxes(volume, scored) if cfg.frame == "lungs" else {}
    h, w = volume.hu.shape[1:]
    for i in scored:
        t, b, left, r = boxes.get(i, (0, h, 0, w))
        img = grey[i, t:b, left:r].astype(np.float32) / 255.0
        cam, _ = predictor.explain(
            ScanImage(pixels=img, format="CT", mode="HU", path=Path(volume.names[i])), result.positive_class
        )
        if cam.shape != img.shape:  # maps are made at most 1,024 px on the longer side
            from PIL import Image

            cam = np.asarray(Image.fromarray(cam.astype(np.float32)).resize((img.shape[1], img.shape[0]), Image.BILINEAR))
        heat[i, t:b, left:r] = cam
    paths = (out / "lung_window.nii.gz", out / "heatmap.nii.gz")
    nib.save(volume.to_nifti(grey), paths[0])
    nib.save(volume.to_nifti(heat), paths[1])
    return paths


def studies_markdown(s: dict) -> str:
    def f(v):
        return "n/a" if v is None or v != v else f"{v:.3f}"

    lines = [
        "# CT studies: patient-level results",
        "",
        f"Window {s['window'][0]:g} / {s['window'][1]:g} HU, frame {s['frame']}, rule {s['rule']}. "
        "Research use only; not a medical device.",
        "",
        "| series | truth | p(covid) | predicted | lung slices scored | slices |",
        "|---|---|---|---|---|---|",
    ]
    for st in s["studies"]:
        lines.append(
            f"| {st['series']} | {st['truth']} | {f(st['probability'])} | {st['label']} | {st['n_scored']} | {st['n_slices']} |"
        )
    n = s["n_slices"]
    lines += [
        "",
        f"- patient accuracy: {f(s['patient_accuracy'])}; patient AUROC: {f(s['patient_auroc'])} "
        f"({len(s['studies'])} studies: no interval is meaningful at this size)",
        f"- slice AUROC, infected slices of COVID studies ({n['infected_covid']}) vs every scored slice of the "
        f"non-COVID studies ({n['noncovid']}): {f(s['slice_auroc_infected_vs_noncovid'])}",
        f"- slice AUROC, infected vs clear slices inside the COVID studies ({n['infected_covid']} / {n['clear_covid']}): "
        f"{f(s['slice_auroc_infected_vs_clear_in_covid'])}",
        "",
        "Per study: `<series>/slices.csv`, `slices.png` (probability along the body axis), `montage.png` "
        "(highest-scoring slices with Grad-CAM).",
    ]
    return "\n".join(lines) + "\n"


def _auroc(pos, neg) -> float | None:
    from sklearn.metrics import roc_auc_score

    if not len(pos) or not len(neg):
        return None
    return float(roc_auc_score([1] * len(pos) + [0] * len(neg), list(pos) + list(neg)))


def evaluate_studies(predictor, data, out=None, *, cfg: StudyConfig | None = None, figures: bool = True) -> dict:
    """Patient- and slice-level results of a CT model on a folder of studies with a manifest.

    ``manifest.csv``: ``series`` (folder, relative), ``task_label`` (else ``label``; ``cap`` counts as
    non-COVID); optional ``slice_labels.csv`` (``file``, ``infection`` 0/1) beside it. Slice-level AUROC:
    infected slices of COVID studies against every scored slice of the non-COVID studies, and infected
    against clear slices inside the COVID studies.
    """
    root, rows, infection = read_studies(data)
    cfg = cfg or study_config(predictor)
    studies, pos, neg, inf_in, clear_in = [], [], [], [], []
    for r in rows:
        truth = study_truth(r)
        vol = read_volume(root / r["series"])
        res = predict_study(predictor, vol, cfg=cfg)
        if out is not None and figures:
            write_study(res, Path(out) / Path(r["series"]).name, predictor=predictor, volume=vol)
        for s in res.scored:
            key = (Path(r["series"]) / s["name"]).as_posix()
            lab = infection.get(key)
            if truth == "covid":
                if lab == 1:
                    pos.append(s["probability"])
                    inf_in.append(s["probability"])
                elif lab == 0:
                    clear_in.append(s["probability"])
            else:
                neg.append(s["probability"])
        studies.append({
            **res.to_dict(), "series": r["series"], "truth": truth, "correct": res.label == truth,
            "scored_probabilities": [s["probability"] for s in res.scored],  # lets callers try other rules
        })  # fmt: skip
    decided = [s for s in studies if s["label"] != UNDETERMINED]  # no lung slice: no probability to rank
    y = [s["truth"] == "covid" for s in decided]
    p = [s["probability"] for s in decided]
    summary = {
        "studies": studies,
        "window": [cfg.window_center, cfg.window_width],
        "frame": cfg.frame,
        "rule": cfg.rule,
        "patient_accuracy": float(np.mean([s["correct"] for s in studies])) if studies else None,
        "patient_auroc": _auroc([q for q, t in zip(p, y) if t], [q for q, t in zip(p, y) if not t]),
        "slice_auroc_infected_vs_noncovid": _auroc(pos, neg),
        "slice_auroc_infected_vs_clear_in_covid": _auroc(inf_in, clear_in),
        "n_slices": {"infected_covid": len(pos), "noncovid": len(neg), "clear_covid": len(clear_in)},
    }
    if out is not None:
        from covidscan.results import write_json

        Path(out).mkdir(parents=True, exist_ok=True)
        write_json(summary, Path(out) / "studies.json")
        (Path(out) / "report.md").write_text(studies_markdown(summary))
    return summary

"""Shortcut probe: does the model read the lungs, or the source (borders, text, markers, age)?

The evaluated images are shown three ways: unchanged; with the central region (where the
lungs are on a chest X-ray; the whole slice centre on CT) replaced by the image's mean grey
so only the borders remain; and the reverse, only the centre kept. If accuracy barely
drops without the centre, the model is separating classes by what surrounds the lungs
(typically the hospital or collection an image comes from), not by the disease.

``retained`` = (accuracy without the centre - chance) / (full accuracy - chance), where
chance is the majority-class rate of the evaluated set.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import torch

from covidscan.checkpoint import load_checkpoint, model_from_checkpoint
from covidscan.data.dataset import default_cache_dir, open_store
from covidscan.evaluation import select_data
from covidscan.metrics import compute_metrics
from covidscan.predict import predict_index, store_overlap

logger = logging.getLogger(__name__)

#: central box as fractions of the side: x from 0.2 to 0.8, y from 0.15 to 0.9 (the lung field on a PA/AP film)
CENTRE = (0.2, 0.8, 0.15, 0.9)


def centre_mask(size: int, box=CENTRE) -> torch.Tensor:
    x0, x1, y0, y1 = (int(round(v * size)) for v in box)
    m = torch.zeros(size, size, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def mask_images(images: torch.Tensor, keep: str, box=CENTRE) -> torch.Tensor:
    """``N x 1 x S x S`` uint8; ``keep="borders"`` greys out the centre, ``keep="centre"`` the borders."""
    m = centre_mask(images.shape[-1], box)
    hide = m if keep == "borders" else ~m
    out = images.clone()
    fill = images.float().mean(dim=(1, 2, 3)).round().to(torch.uint8)  # per-image mean grey
    out[:, :, hide] = fill.view(-1, 1, 1).expand(-1, 1, int(hide.sum()))
    return out


def probe(checkpoint, data=None, *, split_file=None, subset: str = "test", device: str = "auto") -> dict:
    checkpoint = Path(checkpoint)
    obj = load_checkpoint(checkpoint)
    model, meta = model_from_checkpoint(obj, checkpoint)
    index, where = select_data(checkpoint, data, split_file, subset, meta.task)
    pre = meta.preprocess
    store = open_store(index.records, pre, packed=index.packed, cache_dir=default_cache_dir() / "images")
    ov, _ = store_overlap(obj.get("provenance"), store)
    if not ov.external:
        logger.warning("%s", ov.line())
    # masking needs the images in memory: a packed folder's rows are read once here
    full_images = store.images[torch.arange(len(index))] if index.packed is not None else store.images
    results = {}
    for name, keep in (
        ("full image", None),
        ("borders only (centre masked)", "borders"),
        ("centre only (borders masked)", "centre"),
    ):
        st = store
        if keep:
            st = copy.copy(store)
            st.images = mask_images(full_images, keep)
        preds = predict_index(model, meta, index, device=device, store=st)
        m = compute_metrics(preds.y, preds.probs)
        results[name] = {"accuracy": m["accuracy"], "macro_auroc": m["macro"]["auroc"]}
    y = preds.y
    chance = float(np.bincount(y).max() / len(y))
    full = results["full image"]["accuracy"]
    border = results["borders only (centre masked)"]["accuracy"]
    retained, verdict = judge(full, border, chance)
    return {
        "checkpoint": str(checkpoint),
        "evaluated_on": where,
        "n": int(len(y)),
        "chance": chance,
        "results": results,
        "retained": retained,
        "verdict": verdict,
        "centre_box": CENTRE,
        "overlap": ov.to_dict(),
    }


def judge(full: float, border: float, chance: float) -> tuple[float, str]:
    """``(retained, verdict)`` from the accuracies on full images and on borders only."""
    retained = (border - chance) / (full - chance) if full > chance else float("nan")
    if retained != retained:
        verdict = "The model is no better than chance on the full images; the probe says nothing."
    elif retained >= 0.5:
        verdict = (
            f"WARNING: with the lungs hidden the model keeps {retained:.0%} of its above-chance accuracy. "
            "It is largely reading the borders (source, text, markers, body size), not the disease. "
            "Its accuracy on this data does not show that it detects COVID-19."
        )
    elif retained >= 0.2:
        verdict = (
            f"With the lungs hidden the model keeps {retained:.0%} of its above-chance accuracy: "
            "part of its decision comes from outside the lung field. Treat its accuracy with caution."
        )
    else:
        verdict = (
            f"With the lungs hidden the model keeps only {retained:.0%} of its above-chance accuracy: "
            "it relies mainly on the central (lung) region."
        )
    return retained, verdict


def probe_markdown(r: dict) -> str:
    lines = [
        "# Shortcut probe",
        "",
        f"- checkpoint: `{r['checkpoint']}`",
        f"- evaluated on: {r['evaluated_on']} (n = {r['n']})",
        f"- seen in training: {r['overlap']['summary'] if r.get('overlap') else 'not checked'}",
        f"- chance (majority class): {r['chance'] * 100:.1f} %",
        f"- centre box (fractions of width / height): x {r['centre_box'][0]}–{r['centre_box'][1]}, "
        f"y {r['centre_box'][2]}–{r['centre_box'][3]}",
        "",
        "| input | accuracy % | macro AUROC |",
        "|---|---:|---:|",
    ]
    for name, v in r["results"].items():
        lines.append(f"| {name} | {v['accuracy'] * 100:.1f} | {v['macro_auroc']:.3f} |")
    lines += ["", r["verdict"], ""]
    return "\n".join(lines)

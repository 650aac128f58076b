"""Adapting a trained model to a new site: without labels (BatchNorm statistics) and with a few (threshold).

* :func:`adapt_batchnorm` re-estimates every BatchNorm layer's running mean and variance on
  unlabelled scans of the new site (Li et al. 2016, "Revisiting batch normalization for
  practical domain adaptation", AdaBN). Weights and biases are not touched; only the
  running statistics change.
* :func:`threshold_for_sensitivity` picks the operating threshold of the positive class from a
  site's own labelled scans: the highest threshold whose sensitivity there is at least the
  target. :func:`calibrate` stores it in the checkpoint, and ``predict``, ``serve`` and the
  page then report positive / negative at it as well as the probabilities.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from covidscan.checkpoint import CheckpointMeta, load_checkpoint, model_from_checkpoint, save_checkpoint
from covidscan.data import load_dataset
from covidscan.data.dataset import ImageStore, default_cache_dir, open_store
from covidscan.data.manifest import Record
from covidscan.data.packed import is_packed
from covidscan.data.volume import is_studies_folder
from covidscan.errors import DataError
from covidscan.labels import POSITIVE_CLASS
from covidscan.metrics import resampling_units, wilson_interval
from covidscan.predict import batchnorm_statistics, predict_index, store_overlap
from covidscan.runtime import resolve_device

logger = logging.getLogger(__name__)


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, store: ImageStore, *, batch_size: int = 32, device: str = "cpu") -> int:
    """Replace the running statistics of every BatchNorm layer by those of ``store``'s readable images.

    Statistics are reset and accumulated as a plain average over all batches (``momentum=None``),
    with the rest of the network in eval mode (dropout off). Returns the number of images used.
    """
    images = store.images[torch.from_numpy(store.valid)]
    dev = resolve_device(device)
    model.to(dev)  # a checkpoint's model is built on the CPU; "auto" may mean CUDA
    return batchnorm_statistics(model, images, store.pre, batch_size=batch_size, device=dev)


MIN_CALIBRATION = 50  # fewer positives or negatives than this: the operating point is a rough estimate


def threshold_for_sensitivity(y_pos: np.ndarray, score: np.ndarray, sensitivity: float = 0.95) -> dict:
    """The highest threshold ``t`` with sensitivity(score >= t) >= ``sensitivity`` on these labels.

    ``y_pos``: 1 for the positive class, 0 otherwise; ``score``: its probability. Returns the
    threshold and the sensitivity and specificity it gives on these data, each with a 95% Wilson
    interval (``sensitivity_ci95``, ``specificity_ci95``).
    """
    y_pos, score = np.asarray(y_pos, dtype=bool), np.asarray(score, dtype=np.float64)
    if not 0 < sensitivity <= 1:
        raise DataError(f"sensitivity={sensitivity}: must be in (0, 1]")
    pos = np.sort(score[y_pos])[::-1]
    if len(pos) == 0:
        raise DataError(f"no {POSITIVE_CLASS} images in the calibration data: cannot set a threshold for sensitivity")
    k = math.ceil(sensitivity * len(pos) - 1e-9)  # positives that must score at or above t
    t = float(pos[k - 1])
    neg = score[~y_pos]
    tp, tn = int((pos >= t).sum()), int((neg < t).sum())
    return {
        "value": t,
        "sensitivity": tp / len(pos),
        "sensitivity_ci95": list(wilson_interval(tp, len(pos))),
        "specificity": tn / len(neg) if len(neg) else math.nan,
        "specificity_ci95": list(wilson_interval(tn, len(neg))),
        "positives": int(len(pos)),
        "negatives": int(len(neg)),
    }


def threshold_interval(y_pos, score, groups=None, sensitivity: float = 0.95, *, n_boot: int = 1000, seed: int = 0) -> list:
    """95% percentile interval of the threshold :func:`threshold_for_sensitivity` would choose, over
    bootstrap resamples of whole groups (patients; images when ``groups`` is None) that hold a positive."""
    y_pos, score = np.asarray(y_pos, dtype=bool), np.asarray(score, dtype=np.float64)
    units, rng, values = resampling_units(groups, len(y_pos)), np.random.default_rng(seed), []
    for _ in range(n_boot):
        idx = np.concatenate([units[j] for j in rng.integers(0, len(units), len(units))])
        if y_pos[idx].any():
            values.append(threshold_for_sensitivity(y_pos[idx], score[idx], sensitivity)["value"])
    return [float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))] if values else [math.nan, math.nan]


def calibration_warnings(t: dict) -> list[str]:
    """What makes an operating point uncertain: too few positives or negatives."""
    out = []
    for side in ("positives", "negatives"):
        if t[side] < MIN_CALIBRATION:
            out.append(
                f"only {t[side]} {side}: the {'sensitivity' if side == 'positives' else 'specificity'} at this threshold "
                f"is a rough estimate (see its interval); label at least {MIN_CALIBRATION}"
            )
    return out


def calibrate(
    checkpoint,
    data,
    out,
    *,
    sensitivity: float = 0.95,
    device: str = "auto",
    allow_training_images: bool = False,
    n_boot: int = 1000,
) -> CheckpointMeta:
    """Choose the ``covid`` threshold for ``sensitivity`` on labelled ``data`` and write ``out``:
    the same model with the threshold, its interval and the sensitivity / specificity it gives (95%
    intervals) in its metadata.

    Raises:
        DataError: some of ``data`` are images the model trained or validated on, or near-duplicates of
            them (a threshold set on them is optimistic), unless ``allow_training_images``; no positives.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    obj = load_checkpoint(checkpoint)
    model, meta = model_from_checkpoint(obj, checkpoint)
    data_names = [str(d) for d in ([data] if isinstance(data, (str, Path)) else data)]
    studies = meta.task == "ct" and len(data_names) == 1 and is_studies_folder(data_names[0])
    if studies:  # a CT model on patients: the threshold applies to study scores, set on held-out patients
        y_pos, score, groups, ov = study_scores(model, meta, obj.get("provenance"), data_names[0], device)
    else:
        y_pos, score, groups, ov = image_scores(model, meta, obj.get("provenance"), data, device)
    if ov.checked and not ov.external and not allow_training_images:
        raise DataError(f"{ov.line()}; calibrate on scans the model never saw, or pass --allow-training-images to do it anyway")
    chosen = threshold_for_sensitivity(y_pos, score, sensitivity)
    chosen["value_ci95"] = threshold_interval(y_pos, score, groups, sensitivity, n_boot=n_boot)
    threshold = {
        "class": POSITIVE_CLASS,
        "level": "study" if studies else "image",
        **chosen,
        "target_sensitivity": sensitivity,
        "data": ", ".join(data_names),
        "warnings": calibration_warnings(chosen) + ([] if ov.external else [ov.line()]),
        "overlap": ov.to_dict(),
        "training_images_allowed": bool(allow_training_images),
    }
    for w in threshold["warnings"]:
        logger.warning("calibrate: %s", w)
    new = meta.replace(threshold=threshold)
    save_checkpoint(out, obj["state_dict"], new, provenance=obj.get("provenance"))
    return new


def image_scores(model, meta, provenance, data, device):
    """``(covid?, p(covid), groups, overlap)`` of every readable image of ``data``."""
    index = load_dataset(data, meta.task)
    store = open_store(index.records, meta.preprocess, packed=index.packed, cache_dir=default_cache_dir() / "images")
    ov, _ = store_overlap(provenance, store)
    preds = predict_index(model, meta, index, device=device, store=store)
    pos = meta.class_names.index(POSITIVE_CLASS)
    groups = [r.group for r in preds.index.records] if preds.index.grouping != "image" else None
    return preds.y == pos, preds.probs[:, pos], groups, ov


def study_scores(model, meta, provenance, folder, device):
    """``(covid?, study p(covid), groups, overlap)`` of every study of a studies folder (like ``ct-volumes``); the
    overlap is that of their scored slices with the training record. A study where no lung slice was found has no
    score and is left out."""
    from covidscan.data.volume import read_volume
    from covidscan.inference import Predictor
    from covidscan.provenance import fingerprints, overlap
    from covidscan.study import UNDETERMINED, lung_slice_images, predict_study, read_studies, study_config, study_truth

    predictor = Predictor(model, meta, str(resolve_device(device)), provenance=provenance)
    cfg = study_config(predictor)
    root, studies, _ = read_studies(folder)
    y, p, groups, images = [], [], [], []
    for st in studies:
        vol = read_volume(root / st["series"])
        res = predict_study(predictor, vol, cfg=cfg)
        images += lung_slice_images(vol, cfg, meta.preprocess)
        if res.label != UNDETERMINED:
            y.append(study_truth(st) == POSITIVE_CLASS)
            p.append(res.probability)
            groups.append(st["series"])
    stack = torch.stack(images) if images else torch.zeros((0, 1, 8, 8), dtype=torch.uint8)
    return np.asarray(y), np.asarray(p, dtype=np.float64), groups, overlap(provenance, fingerprints(stack))


def study_slice_images(meta: CheckpointMeta, studies: list[Path]) -> torch.Tensor:
    """The scored lung slices of each CT study as the study scorer reads them (the checkpoint's window, lung
    selection and framing), ``N x 1 x S x S`` uint8: what ``covidscan adapt`` takes statistics from when given
    series, so they match what ``predict`` / ``evaluate`` feed the model, not the files' own display."""
    from covidscan.data.volume import read_volume
    from covidscan.study import lung_slice_images, study_config

    cfg = study_config(meta)
    images = [im for path in studies for im in lung_slice_images(read_volume(path), cfg, meta.preprocess)]
    size = meta.preprocess.image_size
    return torch.stack(images) if images else torch.zeros((0, 1, size, size), dtype=torch.uint8)


def adapt(checkpoint, images: list[Path], out, *, device: str = "auto") -> CheckpointMeta:
    """Write ``out``: ``checkpoint`` with its BatchNorm statistics re-estimated on ``images`` (no labels
    needed): image files and folders of them, or one packed folder (``covidscan pack``, made with the model's
    preprocessing). For a CT model, series (DICOM folders, NIfTI, zip, a studies folder) count by their scored
    lung slices, read as the study scorer reads them (:func:`study_slice_images`)."""
    from covidscan.data.io import expand_paths
    from covidscan.provenance import fingerprints, overlap
    from covidscan.study import find_studies

    checkpoint, out = Path(checkpoint), Path(out)
    obj = load_checkpoint(checkpoint)
    model, meta = model_from_checkpoint(obj, checkpoint)
    packs = [p for p in images if is_packed(p)]
    dev = resolve_device(device)
    model.to(dev)
    if packs:
        if len(images) != 1:
            raise DataError(f"{packs[0]}: a packed folder is adapted on alone, not with other files or folders")
        index = load_dataset(packs[0], meta.task)
        store = open_store(index.records, meta.preprocess, packed=index.packed)
        ov, _ = store_overlap(obj.get("provenance"), store)
        n, skipped = adapt_batchnorm(model, store, device=device), len(store.skipped)
    else:
        studies, files = find_studies(images) if meta.task == "ct" else ([], expand_paths(images))
        parts, skipped = [], 0
        if files:
            records = [Record(path=Path(p).resolve(), label=meta.class_names[0]) for p in files]
            store = ImageStore(records, meta.preprocess, cache_dir=default_cache_dir() / "images")
            parts.append(store.images[torch.from_numpy(store.valid)])
            skipped = len(store.skipped)
        if studies:
            parts.append(study_slice_images(meta, studies))
        stack = torch.cat(parts) if parts else torch.zeros((0, 1, 8, 8), dtype=torch.uint8)
        ov = overlap(obj.get("provenance"), fingerprints(stack))
        n = batchnorm_statistics(model, stack, meta.preprocess, device=dev)
    if not ov.external:
        logger.warning("adapt: %s", ov.line())
    if n < 2:
        raise DataError(f"BatchNorm adaptation needs at least 2 readable images; got {n}")
    new = meta.replace(
        adaptation={"method": "batchnorm statistics (AdaBN)", "images": n, "skipped": skipped, "overlap": ov.to_dict()}
    )
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_checkpoint(out, state, new, provenance=obj.get("provenance"))
    return new

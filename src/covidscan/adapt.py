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
from covidscan.data.transforms import model_input
from covidscan.errors import DataError
from covidscan.evaluation import predict_index
from covidscan.labels import POSITIVE_CLASS
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


@torch.no_grad()
def batchnorm_statistics(model: nn.Module, images: torch.Tensor, pre, *, batch_size: int = 32, device=None) -> int:
    """Re-estimate every BatchNorm layer's running mean / variance on ``images`` (``N x 1 x S x S`` uint8).

    Also what training's ``train.precise_bn`` calls after each epoch ("precise BN", Wu & Johnson
    2021): with a low BatchNorm momentum (EfficientNet-Lite's 0.01) a short fine-tune otherwise
    validates with statistics that are still mostly ImageNet's.
    """
    dev = device or next(model.parameters()).device
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    saved = [(m, m.momentum) for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts the same
        m.train()
    was_training = model.training
    n = 0
    try:
        for k in range(0, len(images), batch_size):
            batch = images[k : k + batch_size]
            if len(batch) < 2:
                continue  # batch norm cannot take statistics of one image
            model(model_input(batch, pre, dev))
            n += len(batch)
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was_training)
    return n


def threshold_for_sensitivity(y_pos: np.ndarray, score: np.ndarray, sensitivity: float = 0.95) -> dict:
    """The highest threshold ``t`` with sensitivity(score >= t) >= ``sensitivity`` on these labels.

    ``y_pos``: 1 for the positive class, 0 otherwise; ``score``: its probability. Returns the
    threshold and the sensitivity and specificity it gives on these data.
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
    return {
        "value": t,
        "sensitivity": float((pos >= t).mean()),
        "specificity": float((neg < t).mean()) if len(neg) else math.nan,
        "positives": int(len(pos)),
        "negatives": int(len(neg)),
    }


def calibrate(checkpoint, data, out, *, sensitivity: float = 0.95, device: str = "auto") -> CheckpointMeta:
    """Choose the ``covid`` threshold for ``sensitivity`` on labelled ``data`` and write ``out``:
    the same model with the threshold in its metadata."""
    checkpoint, out = Path(checkpoint), Path(out)
    obj = load_checkpoint(checkpoint)
    model, meta = model_from_checkpoint(obj, checkpoint)
    index = load_dataset(data, meta.task)
    preds = predict_index(model, meta, index, device=device, cache_dir=default_cache_dir() / "images")
    pos = meta.class_names.index(POSITIVE_CLASS)
    chosen = threshold_for_sensitivity(preds.y == pos, preds.probs[:, pos], sensitivity)
    data_names = [str(d) for d in ([data] if isinstance(data, (str, Path)) else data)]
    threshold = {"class": POSITIVE_CLASS, **chosen, "target_sensitivity": sensitivity, "data": ", ".join(data_names)}
    new = meta.replace(threshold=threshold)
    save_checkpoint(out, obj["state_dict"], new)
    return new


def adapt(checkpoint, images: list[Path], out, *, device: str = "auto") -> CheckpointMeta:
    """Write ``out``: ``checkpoint`` with its BatchNorm statistics re-estimated on ``images`` (no labels
    needed): image files, or one packed folder (``covidscan pack``, made with the model's preprocessing)."""
    checkpoint, out = Path(checkpoint), Path(out)
    obj = load_checkpoint(checkpoint)
    model, meta = model_from_checkpoint(obj, checkpoint)
    packs = [p for p in images if is_packed(p)]
    if packs:
        if len(images) != 1:
            raise DataError(f"{packs[0]}: a packed folder is adapted on alone, not with other files or folders")
        index = load_dataset(packs[0], meta.task)
        store = open_store(index.records, meta.preprocess, packed=index.packed)
    else:
        records = [Record(path=Path(p).resolve(), label=meta.class_names[0]) for p in images]
        store = ImageStore(records, meta.preprocess, cache_dir=default_cache_dir() / "images")
    n = adapt_batchnorm(model, store, device=device)
    if n < 2:
        raise DataError(f"BatchNorm adaptation needs at least 2 readable images; got {n}")
    new = meta.replace(adaptation={"method": "batchnorm statistics (AdaBN)", "images": n, "skipped": len(store.skipped)})
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_checkpoint(out, state, new)
    return new

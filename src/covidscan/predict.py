"""Models on images, with no training and no reports: the layer both training and use stand on.

* :func:`predict_loader`: whole-split softmax probabilities, labels and mean cross-entropy over a loader
  (training's validation and every evaluation);
* :func:`predict_index`: the same for a :class:`~covidscan.data.DatasetIndex` (decoded once into a store);
* :func:`store_overlap` / :func:`overlap_preds`: those images against a checkpoint's training record;
* :func:`batchnorm_statistics`: BatchNorm running statistics re-estimated on images (training's precise
  BN and ``covidscan adapt``).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from covidscan.checkpoint import CheckpointMeta
from covidscan.data import DatasetIndex
from covidscan.data.dataset import ImageStore, ScanDataset, open_store, scan_loader
from covidscan.data.transforms import Preprocess, model_input
from covidscan.provenance import Overlap, fingerprints, overlap
from covidscan.runtime import resolve_device

logger = logging.getLogger(__name__)


@torch.no_grad()
def predict_loader(
    model, loader, device, autocast=nullcontext, pre: Preprocess | None = None, *, tta: bool = False, progress: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Whole-split softmax probabilities ``N x C``, labels, dataset indices and mean cross-entropy.

    ``tta``: test-time augmentation, the mean of the probabilities of each image and its mirror image;
    ``progress``: a bar over the batches.
    """
    from tqdm.auto import tqdm

    model.eval()
    probs, labels, idx, loss_sum = [], [], [], 0.0
    for batch in tqdm(loader, desc="predict", unit="batch", leave=False, disable=not progress):
        x = model_input(batch["image"], pre, device)
        y = batch["label"].to(device)
        with autocast():
            logits = model(x).float()
            if tta:  # log of the mean probability: softmax of it is that mean
                logits = ((logits.softmax(1) + model(x.flip(-1)).float().softmax(1)) / 2).clamp_min(1e-12).log()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        probs.append(logits.softmax(1).cpu())
        labels.append(y.cpu())
        idx.append(batch["index"])
    if not probs:
        return np.zeros((0, 0)), np.zeros(0, dtype=int), np.zeros(0, dtype=int), 0.0
    p, y = torch.cat(probs).numpy(), torch.cat(labels).numpy()
    return p, y, torch.cat(idx).numpy(), loss_sum / max(len(y), 1)


@dataclass
class Predictions:
    index: DatasetIndex  # only the images that could be read
    probs: np.ndarray  # N x C
    y: np.ndarray  # N
    skipped: list[tuple[str, str]]
    rows: np.ndarray | None = None  # each prediction's row in the image store it was read from
    seen: list[str] | None = None  # per image: "train", "val", "near-train", "near-val" or "" (covidscan.provenance)


def predict_index(
    model,
    meta: CheckpointMeta,
    index: DatasetIndex,
    *,
    device: str = "auto",
    batch_size: int = 32,
    cache_dir: Path | None = None,
    progress: bool = False,
    store: ImageStore | None = None,
    tta: bool = False,
) -> Predictions:
    """Softmax probabilities of ``model`` for every readable image of ``index`` (``tta``: with its mirror image)."""
    dev = resolve_device(device)
    pre = meta.preprocess
    store = store or open_store(index.records, pre, packed=index.packed, cache_dir=cache_dir, progress=progress)
    targets = [meta.class_names.index(r.label) for r in index.records]
    ds = ScanDataset(store, list(range(len(index))), targets, pre)
    loader = scan_loader(ds, batch_size=batch_size, shuffle=False)
    model.to(dev)
    probs, y, idx, _ = predict_loader(model, loader, dev, pre=pre, tta=tta, progress=progress)
    kept = index.subset(idx.tolist())
    return Predictions(kept, probs, y, store.skipped, rows=idx)


def store_overlap(provenance: dict | None, store) -> tuple[Overlap, dict[int, str]]:
    """:func:`covidscan.provenance.overlap` of a store's readable images with a checkpoint's record,
    and each store row's verdict ("train", "val", "near-train", "near-val" or "")."""
    rows = np.flatnonzero(store.valid).tolist()
    ov = overlap(provenance, fingerprints(store.images, rows))
    return ov, dict(zip(rows, ov.per_image))


def overlap_preds(
    provenance: dict | None,
    model,
    meta: CheckpointMeta,
    index: DatasetIndex,
    *,
    device: str = "auto",
    cache_dir: Path | None = None,
    progress: bool = False,
    tta: bool = False,
    store=None,
) -> tuple[Predictions, Overlap]:
    """:func:`predict_index` plus the overlap of those images with the model's training record
    (``provenance``), logged as a warning unless none of them was seen in training."""
    store = store or open_store(index.records, meta.preprocess, packed=index.packed, cache_dir=cache_dir, progress=progress)
    ov, seen = store_overlap(provenance, store)
    if not ov.external:
        logger.warning("%s", ov.line())
    preds = predict_index(model, meta, index, device=device, store=store, tta=tta, progress=progress)
    preds.seen = [seen.get(int(r), "") for r in preds.rows]
    return preds, ov


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

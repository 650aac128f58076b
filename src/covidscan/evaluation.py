"""``covidscan evaluate``: a checkpoint on a split or an external dataset -> metrics, report, figures.

Data to evaluate, in order: ``split_file`` + ``subset``; else ``data`` (every image: an
external validation set); else the run's own ``split.csv`` (beside the checkpoint), test
subset. Classes absent from the evaluated set are reported as absent, with undefined
metrics (``null`` in ``metrics.json``). Prediction over a loader (:func:`predict_loader`)
lives here and is what training's validation uses too.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from covidscan.checkpoint import CheckpointMeta, load_checkpoint, model_from_checkpoint
from covidscan.data import DatasetIndex, load_dataset, read_split
from covidscan.data.dataset import ImageStore, ScanDataset, default_cache_dir, open_store, scan_loader
from covidscan.data.transforms import Preprocess, model_input
from covidscan.errors import DataError
from covidscan.labels import POSITIVE_CLASS
from covidscan.metrics import bootstrap_ci, compute_metrics, expected_calibration_error, operating_points
from covidscan.provenance import Overlap, fingerprints, overlap
from covidscan.reports import write_evaluation
from covidscan.results import EvaluationResult
from covidscan.runtime import resolve_device

logger = logging.getLogger(__name__)


@torch.no_grad()
def predict_loader(
    model, loader, device, autocast=nullcontext, pre: Preprocess | None = None, *, tta: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Whole-split softmax probabilities ``N x C``, labels, dataset indices and mean cross-entropy.

    ``tta``: test-time augmentation, the mean of the probabilities of each image and its mirror image.
    """
    model.eval()
    probs, labels, idx, loss_sum = [], [], [], 0.0
    for batch in loader:
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
    probs, y, idx, _ = predict_loader(model, loader, dev, pre=pre, tta=tta)
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
    preds = predict_index(model, meta, index, device=device, store=store, tta=tta)
    preds.seen = [seen.get(int(r), "") for r in preds.rows]
    return preds, ov


def select_data(
    checkpoint: Path, data=None, split_file=None, subset: str = "test", task: str | None = None
) -> tuple[DatasetIndex, str]:
    """The images to evaluate and a description of where they come from (whether they are new to the
    model is for :func:`store_overlap` to say, not this description).

    Raises:
        DataError: nothing to evaluate (no data, no split, no ``split.csv`` beside the checkpoint).
    """
    if split_file is not None:
        split = read_split(split_file, task)
        return split.subset(subset), f"{subset} subset of {split_file} ({split.protocol} split)"
    if data:
        names = ", ".join(str(d) for d in ([data] if isinstance(data, (str, Path)) else data))
        return load_dataset(data, task), f"the images of {names}"
    own = Path(checkpoint).parent / "split.csv"
    if own.is_file():
        split = read_split(own, task)
        return split.subset(subset), f"{subset} subset of the run's split {own} ({split.protocol} split)"
    raise DataError("nothing to evaluate: give --data or --split (no split.csv beside the checkpoint)")


def evaluate(
    checkpoint,
    data=None,
    *,
    split_file=None,
    subset: str = "test",
    out=None,
    grid: int = 0,
    n_boot: int = 1000,
    device: str = "auto",
    progress: bool = False,
    seed: int = 0,
    tta: bool = False,
    grid_errors_first: bool = True,
    by: tuple[str, ...] = (),
) -> EvaluationResult:
    """Evaluate; with ``out`` write ``metrics.json``, ``report.md``, ``report.html`` and PNG figures there.
    ``tta``: average each image's probabilities with its mirror image's; ``grid``: that many test scans drawn,
    mistakes first (``grid_errors_first=False``: at random, as the paper's figure); ``by``: manifest fields
    (``source``, or a column / ``source_label`` entry such as ``view``) to report subgroups by."""
    checkpoint = Path(checkpoint)
    obj = load_checkpoint(checkpoint)
    model, meta = model_from_checkpoint(obj, checkpoint)
    index, where = select_data(checkpoint, data, split_file, subset, meta.task)
    if len(index) == 0:
        raise DataError(f"no images to evaluate in {where}")
    cache = default_cache_dir() / "images"
    preds, ov = overlap_preds(
        obj.get("provenance"), model, meta, index, device=device, cache_dir=cache, progress=progress, tta=tta
    )
    if len(preds.y) == 0:
        raise DataError(f"no readable image to evaluate in {where}")
    result = summarise(
        preds,
        meta,
        where + (" (test-time augmentation: image + mirror)" if tta else ""),
        checkpoint=checkpoint,
        n_boot=n_boot,
        seed=seed,
    )
    result.overlap = ov.to_dict()
    if by:
        result.extra["subgroups"] = {f: subgroups(preds, meta, f) for f in by}
    if out is not None:
        write_evaluation(result, preds, Path(out), grid=grid, seed=seed, errors_first=grid_errors_first)
    return result


def subgroups(preds: Predictions, meta: CheckpointMeta, field: str) -> list[dict]:
    """Per value of ``field`` (``source``, else :meth:`Record.attribute`; "?" when unrecorded): images,
    accuracy, COVID sensitivity, specificity and AUROC (:func:`compute_metrics` on the subgroup; None
    where undefined), and sensitivity / specificity at the stored threshold when the checkpoint has one."""
    pos = list(meta.class_names).index(POSITIVE_CLASS)
    values = np.asarray([(r.source if field == "source" else r.attribute(field)) or "?" for r in preds.index.records])
    y, probs = np.asarray(preds.y), np.asarray(preds.probs)
    thr = (meta.threshold or {}).get("value")

    def defined(v):
        return None if v is None or not np.isfinite(v) else float(v)

    rows = []
    for v in sorted(set(values)):
        sel = values == v
        m, covid = compute_metrics(y[sel], probs[sel]), y[sel] == pos
        per = m["per_class"]
        row = {"value": str(v), "images": int(sel.sum()), "covid": int(covid.sum()), "accuracy": m["accuracy"]}
        row.update({f"covid_{k}": defined(per[k][pos]) for k in ("sensitivity", "specificity", "auroc")})
        if thr is not None:
            p = probs[sel, pos]
            row["threshold_sensitivity"] = defined((p[covid] >= thr).mean()) if covid.any() else None
            row["threshold_specificity"] = defined((p[~covid] < thr).mean()) if (~covid).any() else None
        rows.append(row)
    return rows


def summarise(
    preds: Predictions, meta: CheckpointMeta, where: str, *, checkpoint=None, n_boot: int = 1000, seed: int = 0
) -> EvaluationResult:
    """Point metrics, group-bootstrap intervals and calibration of ``preds``."""
    names = list(meta.class_names)
    index = preds.index
    grouping = index.grouping
    groups = [r.group for r in index.records] if grouping != "image" else None
    point = compute_metrics(preds.y, preds.probs)
    ci = bootstrap_ci(preds.y, preds.probs, groups, n_boot=n_boot, seed=seed) if n_boot else {}
    ece, reliability = expected_calibration_error(preds.y, preds.probs)
    points = None
    if POSITIVE_CLASS in names:
        pos = names.index(POSITIVE_CLASS)
        points = operating_points(preds.y == pos, preds.probs[:, pos], groups, n_boot=n_boot, seed=seed)
    counts = {}
    for c, name in enumerate(names):
        recs = [r for r, t in zip(index.records, preds.y) if t == c]
        counts[name] = {"images": len(recs), "patients": len({r.group for r in recs}) if groups else None}
    return EvaluationResult(
        checkpoint=str(checkpoint) if checkpoint else None,
        task=meta.task,
        class_names=names,
        backbone=meta.backbone,
        head=meta.head,
        weights_source=meta.weights_source,
        trained_split_protocol=meta.split_protocol,
        evaluated_on=where,
        grouping=grouping,
        split_type="patient-grouped" if grouping != "image" else "image-level (no patient ids)",
        counts=counts,
        absent_classes=[n for n in names if counts[n]["images"] == 0],
        skipped=[{"path": p, "reason": r} for p, r in preds.skipped],
        metrics=point,
        ci95={k: list(v) for k, v in ci.items()},
        bootstrap={"resamples": n_boot, "unit": "patient group" if groups else "image"},
        ece=ece,
        reliability=reliability,
        threshold=meta.threshold,
        operating_points=points,
    )

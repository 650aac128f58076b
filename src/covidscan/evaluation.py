"""``covidscan evaluate``: a checkpoint on a split or an external dataset -> metrics, report, figures.

Data to evaluate, in order: ``split_file`` + ``subset``; else ``data`` (every image; external only
when none of them is in the model's training record); else the run's own ``split.csv`` (beside the
checkpoint), test subset. Classes absent from the evaluated set are reported as absent, with undefined
metrics (``null`` in ``metrics.json``). Prediction itself is :mod:`covidscan.predict`'s.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np

from covidscan.checkpoint import CheckpointMeta, load_checkpoint, model_from_checkpoint
from covidscan.data import DatasetIndex, load_dataset, read_split
from covidscan.data.dataset import default_cache_dir
from covidscan.errors import DataError
from covidscan.labels import POSITIVE_CLASS
from covidscan.metrics import bootstrap_ci, compute_metrics, expected_calibration_error, operating_points
from covidscan.predict import Predictions, overlap_preds, predict_index, predict_loader, store_overlap  # noqa: F401 (re-exported)
from covidscan.reports import write_evaluation
from covidscan.results import EvaluationResult

logger = logging.getLogger(__name__)


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
    progress: bool | None = None,
    seed: int = 0,
    tta: bool = False,
    grid_errors_first: bool = True,
    by: tuple[str, ...] = (),
) -> EvaluationResult:
    """Evaluate; with ``out`` write ``metrics.json``, ``report.md``, ``report.html`` and PNG figures there.
    ``tta``: average each image's probabilities with its mirror image's; ``grid``: that many test scans drawn,
    mistakes first (``grid_errors_first=False``: at random, as the paper's figure); ``by``: manifest fields
    (``source``, or a column / ``source_label`` entry such as ``view``) to report subgroups by."""
    if progress is None:  # the Python API: bars when someone is watching a terminal
        progress = sys.stderr.isatty()
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
        progress=progress,
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
    preds: Predictions,
    meta: CheckpointMeta,
    where: str,
    *,
    checkpoint=None,
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool = False,
) -> EvaluationResult:
    """Point metrics, group-bootstrap intervals and calibration of ``preds``."""
    names = list(meta.class_names)
    index = preds.index
    grouping = index.grouping
    groups = [r.group for r in index.records] if grouping != "image" else None
    point = compute_metrics(preds.y, preds.probs)
    logger.info("bootstrap: %d resamples of %s for the 95%% intervals", n_boot, "patient groups" if groups else "images")
    ci = bootstrap_ci(preds.y, preds.probs, groups, n_boot=n_boot, seed=seed, progress=progress) if n_boot else {}
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

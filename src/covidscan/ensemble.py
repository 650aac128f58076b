"""Ensembles: several trained models whose class probabilities are averaged, stored as one checkpoint.

``covidscan ensemble A.pt B.pt --out ens.pt`` writes a checkpoint that ``predict``, ``serve``,
``evaluate``, ``explain``, ``calibrate`` and ``export`` accept like any other. Members must
share the task and the preprocessing (normalisation, crop and lung options), so one input
tensor feeds them all; they may differ in backbone, head, training and input size. The
ensemble reads images at its largest member's size; a member trained at a smaller size gets
that tensor resized to its own inside the forward pass (bilinear, so it exports to ONNX),
e.g. InceptionV3 at 299 px with EfficientNet-Lite0 at 224 px.

The ensemble's forward returns ``log(mean_k softmax(f_k(x)))``: logits whose softmax is exactly
the members' mean probability, so everything downstream (softmax, cross-entropy, ONNX export)
works unchanged. Grad-CAM explains the mean through the first member's feature map. The module is
:class:`covidscan.models.ensemble.Ensemble`; :func:`covidscan.training.ensemble.train_ensemble` trains one.
"""

from __future__ import annotations

from pathlib import Path

from covidscan.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from covidscan.errors import CheckpointError
from covidscan.provenance import merge_records

#: preprocessing fields the members must agree on (image_size may differ: see the module docstring)
SHARED = ("mean", "std", "equalize", "crop", "lung_crop", "lungs", "body_crop", "lung_mask")


def member_record(meta: CheckpointMeta, path: Path) -> dict:
    return {
        "checkpoint": str(path),
        "backbone": meta.backbone,
        "head": meta.head,
        "dropout": meta.dropout,
        "image_size": meta.preprocess.image_size,
        "weights_source": meta.weights_source,
        "config": meta.config,
        "val_metrics": meta.val_metrics,
    }


def make_ensemble(checkpoints: list[str | Path], out: str | Path) -> CheckpointMeta:
    """Write the ensemble of ``checkpoints`` to ``out``; returns its metadata.

    Raises:
        CheckpointError: fewer than two members, or members of other tasks / preprocessing.
    """
    if len(checkpoints) < 2:
        raise CheckpointError("an ensemble needs at least two checkpoints")
    metas, state, records = [], {}, []
    for i, path in enumerate(checkpoints):
        obj = load_checkpoint(path)
        records.append(obj.get("provenance"))
        meta: CheckpointMeta = obj["meta"]
        if meta.members:
            raise CheckpointError(f"{path}: is an ensemble already; list its members instead")
        if metas:
            first = metas[0][0]
            if meta.task != first.task:
                raise CheckpointError(f"{path}: task {meta.task!r} differs from {first.task!r}")
            diff = [k for k in SHARED if getattr(meta.preprocess, k) != getattr(first.preprocess, k)]
            if diff:
                raise CheckpointError(f"{path}: preprocessing differs from the first member in {', '.join(diff)}")
        metas.append((meta, Path(path)))
        state.update({f"members.{i}.{k}": v for k, v in obj["state_dict"].items()})
    first = metas[0][0]
    largest = max((m for m, _ in metas), key=lambda m: m.preprocess.image_size)  # the ensemble's input size
    names = " + ".join(f"{m.backbone}/{m.head}" for m, _ in metas)
    meta = first.replace(
        preprocess=largest.preprocess,
        backbone="ensemble",
        head="mean",
        weights_source="; ".join(m.weights_source for m, _ in metas),
        members=[member_record(m, p) for m, p in metas],
        threshold=None,
        epoch=None,
        val_metrics={},
        extra={**first.extra, "description": f"mean of {len(metas)} members: {names}"},
    )
    save_checkpoint(out, state, meta, provenance=merge_records(records))
    return meta

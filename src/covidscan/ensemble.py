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
works unchanged. Grad-CAM explains the mean through the first member's feature map.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from covidscan.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from covidscan.errors import CheckpointError
from covidscan.provenance import merge_records

#: preprocessing fields the members must agree on (image_size may differ: see the module docstring)
SHARED = ("mean", "std", "equalize", "crop", "lung_crop", "lungs")


class Ensemble(nn.Module):
    """Mean of the members' softmax probabilities, returned as log-probabilities (``N x classes``).

    ``sizes``: each member's input size; a member whose size differs from the input's gets the
    input resized to it (bilinear). ``None``: every member takes the input as it comes.
    """

    def __init__(self, members: list[nn.Module], sizes: list[int | None] | None = None):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        if sizes is not None and len(sizes) != len(members):
            raise ValueError(f"{len(sizes)} sizes for {len(members)} members")
        self.members = nn.ModuleList(members)
        self.sizes = list(sizes) if sizes is not None else [None] * len(members)
        self.spec = replace(members[0].spec, cam_layer="members.0.backbone")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([m(self._fit(x, s)).float().softmax(1) for m, s in zip(self.members, self.sizes)]).mean(0)
        return probs.clamp_min(1e-12).log()

    @staticmethod
    def _fit(x: torch.Tensor, size: int | None) -> torch.Tensor:
        if size is None or tuple(x.shape[-2:]) == (size, size):
            return x
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


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
            a, b = meta.preprocess.to_dict(), first.preprocess.to_dict()
            diff = [k for k in SHARED if a[k] != b[k]]
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


def ensemble_from_meta(meta: CheckpointMeta, state_dict: dict, path) -> Ensemble:
    """Rebuild an :class:`Ensemble` from its checkpoint (called by ``checkpoint.model_from_checkpoint``)."""
    from covidscan.models import build_model

    members = []
    for m in meta.members:
        model, _ = build_model(m["backbone"], m["head"], len(meta.class_names), weights="none", dropout=m.get("dropout"))
        members.append(model)
    size = meta.preprocess.image_size  # members recorded before mixed sizes existed share the ensemble's
    ens = Ensemble(members, [m.get("image_size", size) for m in meta.members])
    try:
        ens.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: ensemble weights do not fit its members ({str(exc)[:200]})") from exc
    return ens.eval()


def train_ensemble(configs: list, data, out, *, overwrite: bool = False, progress: bool = False) -> tuple[Path, list]:
    """Train one member per config into ``out/member<k>`` on one shared split (the first member's,
    grouped), then write ``out/ensemble.pt`` and a copy of the split as ``out/split.csv`` (so
    ``covidscan evaluate --checkpoint out/ensemble.pt`` scores the same held-out test images).

    Returns the ensemble's path and the members' :class:`~covidscan.engine.TrainResult`.
    """
    from covidscan.data import read_split, write_split
    from covidscan.engine import train

    out = Path(out)
    if (out / "ensemble.pt").exists() and not overwrite:
        raise CheckpointError(f"{out} already holds an ensemble; use --overwrite to replace it, or another --out")
    results = []
    for k, cfg in enumerate(configs):
        split = out / "member0" / "split.csv" if k else None
        torch.manual_seed(cfg.train.seed)
        results.append(
            train(cfg, None if split else data, out / f"member{k}", split_file=split, overwrite=overwrite, progress=progress)
        )
    make_ensemble([r.best_checkpoint for r in results], out / "ensemble.pt")
    write_split(read_split(out / "member0" / "split.csv"), out / "split.csv")  # file paths made relative to out
    return out / "ensemble.pt", results

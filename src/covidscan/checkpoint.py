"""Checkpoints: state dict + metadata, loaded with ``torch.load(weights_only=True)``.

Layout (a plain dict of tensors and primitives)::

    {"format": "covidscan-checkpoint", "version": 1,
     "state_dict": {...}, "meta": {...}, "train_state": {...} (last.pt only)}

``meta`` carries everything predict needs and every report states: task, class names,
backbone, head, preprocessing (input size, normalisation, channel policy), weights
source, the resolved config, hashes of the data and the split, validation metrics and
library versions. Files are written to a temporary name and renamed (atomic).
"""

from __future__ import annotations

import os
import platform
import tempfile
from pathlib import Path

import torch

FORMAT = "covidscan-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A file is not a usable covidscan checkpoint; the message says why."""


def library_versions() -> dict:
    import torchvision

    from covidscan import __version__

    return {
        "covidscan": __version__,
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "python": platform.python_version(),
    }


def save_checkpoint(path: str | Path, state_dict: dict, meta: dict, train_state: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {"format": FORMAT, "version": VERSION, "state_dict": state_dict, "meta": meta}
    if train_state is not None:
        obj["train_state"] = train_state
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, *, task: str | None = None) -> dict:
    """Load and validate; ``task`` given -> a checkpoint of another task is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle with objects, random bytes ...
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {str(exc)[:200]})") from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a covidscan checkpoint (no '{FORMAT}' marker)")
    if obj.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {obj.get('version')} not supported (this covidscan reads {VERSION})")
    meta = obj.get("meta") or {}
    for key in ("task", "class_names", "backbone", "head", "preprocess"):
        if key not in meta:
            raise CheckpointError(f"{path}: checkpoint metadata lacks {key!r}")
    if task is not None and meta["task"] != task:
        raise CheckpointError(f"{path}: checkpoint is for task {meta['task']!r}, not {task!r}")
    return obj


def model_from_checkpoint(obj: dict, path: str | Path = "<checkpoint>"):
    """Rebuild the model (eval mode) from a loaded checkpoint; returns ``(model, meta)``."""
    from covidscan.models import build_model

    meta = obj["meta"]
    dropout = meta.get("config", {}).get("model", {}).get("dropout", -1.0)
    model, _ = build_model(
        meta["backbone"],
        meta["head"],
        len(meta["class_names"]),
        weights="none",
        dropout=None if dropout is None or dropout < 0 else dropout,
    )
    try:
        model.load_state_dict(obj["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit {meta['backbone']}+{meta['head']} ({str(exc)[:200]})") from exc
    return model.eval(), meta

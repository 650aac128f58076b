"""Checkpoints: state dict + metadata, loaded with ``torch.load(weights_only=True)``.

Layout (a plain dict of tensors and primitives, so no pickled object is ever executed)::

    {"format": "covidscan-checkpoint", "version": 1,
     "state_dict": {...}, "meta": {...}, "train_state": {...} (last.pt only),
     "provenance": {...} (fingerprints of the training and validation images, covidscan.provenance)}

``meta`` is a :class:`CheckpointMeta` written as a dict: everything predict needs and every
report states (task, class names, backbone, head, preprocessing, weights source, the resolved
config, hashes of the data and the split, validation metrics, library versions, and an
operating threshold once ``covidscan calibrate`` has set one). It is validated on load, so a
checkpoint with duplicate class names, a class list that does not match its task or an
impossible input size is refused with a one-line :class:`CheckpointError`. Files are written
to a temporary name and renamed (atomic).
"""

from __future__ import annotations

import dataclasses
import math
import platform
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torchvision

from covidscan import __version__
from covidscan.config import StudyConfig
from covidscan.data.transforms import Preprocess
from covidscan.errors import CheckpointError
from covidscan.labels import TASKS
from covidscan.models import build_model
from covidscan.models.ensemble import build_ensemble
from covidscan.provenance import valid_record
from covidscan.results import atomic_write

FORMAT = "covidscan-checkpoint"
VERSION = 1


def library_versions() -> dict:
    return {
        "covidscan": __version__,
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "python": platform.python_version(),
    }


@dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint says about its model (torchvision ``Weights.meta`` / timm ``PretrainedCfg``).

    ``threshold``: ``{"class": "covid", "value": t, ...}`` set by ``covidscan calibrate``: the
    probability at or above which the class is reported positive; None = argmax only.
    ``extra`` keeps keys this version does not know, so a newer file round-trips.
    """

    task: str
    class_names: tuple[str, ...]
    backbone: str
    head: str
    preprocess: Preprocess
    weights_source: str = "unknown"
    config: dict = field(default_factory=dict)
    reference: dict = field(default_factory=dict)
    data_fingerprint: str = ""
    split_fingerprint: str = ""
    split_protocol: str | None = None
    grouping: str | None = None
    train_counts: dict = field(default_factory=dict)
    sources: list = field(default_factory=list)
    class_sources: dict = field(default_factory=dict)
    data_origins: list = field(default_factory=list)
    versions: dict = field(default_factory=dict)
    epoch: int | None = None
    val_metrics: dict = field(default_factory=dict)
    threshold: dict | None = None
    adaptation: dict | None = None
    members: list | None = None  # an ensemble's members (covidscan.ensemble); None for a single model
    extra: dict = field(default_factory=dict)

    @property
    def dropout(self) -> float | None:
        d = self.config.get("model", {}).get("dropout", -1.0)
        return None if d is None or d < 0 else float(d)

    def __getitem__(self, key: str):
        """Read access by key, as the metadata dicts of covidscan 0.1 allowed (``meta["class_names"]``)."""
        return self.to_dict()[key]

    def get(self, key: str, default=None):
        return self.to_dict().get(key, default)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("extra", "preprocess")}
        d["class_names"] = list(self.class_names)
        d["preprocess"] = self.preprocess.to_dict()
        d.update(self.extra)
        return d

    def replace(self, **changes) -> CheckpointMeta:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return CheckpointMeta(**values)

    @classmethod
    def from_dict(cls, d: dict, where: str = "<checkpoint>") -> CheckpointMeta:
        """Validate and build; raises :class:`CheckpointError` naming ``where`` and the problem."""
        if not isinstance(d, dict):
            raise CheckpointError(f"{where}: checkpoint metadata is not a mapping")
        for key in ("task", "class_names", "backbone", "head", "preprocess"):
            if key not in d:
                raise CheckpointError(f"{where}: checkpoint metadata lacks {key!r}")
        task, names = d["task"], d["class_names"]
        if task not in TASKS:
            raise CheckpointError(f"{where}: unknown task {task!r} (known: {', '.join(sorted(TASKS))})")
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise CheckpointError(f"{where}: class_names must be a list of names")
        if len(set(names)) != len(names):
            raise CheckpointError(f"{where}: duplicate class names {list(names)}")
        if tuple(names) != TASKS[task]:
            raise CheckpointError(f"{where}: class names {list(names)} do not match task {task!r} ({list(TASKS[task])})")
        try:
            pre = Preprocess.from_dict(d["preprocess"])
            if task == "ct" and pre.hu_window is None:  # written before CT slices had one window: the study's
                st = {**dataclasses.asdict(StudyConfig()), **((d.get("config") or {}).get("study") or {})}
                pre = dataclasses.replace(pre, hu_window=(float(st["window_center"]), float(st["window_width"])))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: stored preprocessing is not valid ({exc})") from None
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: v for k, v in d.items() if k in known}
        values.update(class_names=tuple(names), preprocess=pre)
        thr = values.get("threshold")
        if thr is not None and not (isinstance(thr, dict) and thr.get("class") in names and _probability(thr.get("value"))):
            raise CheckpointError(f"{where}: stored threshold {thr!r} is not a class of the model with a value in [0, 1]")
        versions = values.get("versions", {})
        if not isinstance(versions, dict) or not all(isinstance(v, str) for v in versions.values()):
            raise CheckpointError(f"{where}: stored library versions {versions!r} are not a mapping of names to version strings")
        return cls(**values, extra={k: v for k, v in d.items() if k not in known})


def _probability(v) -> bool:
    """A real number in [0, 1] (not a bool, string, list or NaN)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= 1


def save_checkpoint(
    path: str | Path,
    state_dict: dict,
    meta: CheckpointMeta | dict,
    train_state: dict | None = None,
    *,
    provenance: dict | None = None,
) -> Path:
    """Write a checkpoint atomically. ``provenance``: the record of the images the model was trained
    and validated on (:func:`covidscan.provenance.provenance_record`); keep it when re-saving a model
    (calibrate, adapt, ensemble) so its overlap checks keep working."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = meta.to_dict() if isinstance(meta, CheckpointMeta) else meta
    obj = {"format": FORMAT, "version": VERSION, "state_dict": state_dict, "meta": meta}
    if train_state is not None:
        obj["train_state"] = train_state
    if provenance is not None:
        obj["provenance"] = provenance
    return atomic_write(path, lambda fh: torch.save(obj, fh))


def load_checkpoint(path: str | Path, *, task: str | None = None) -> dict:
    """Load and validate; ``obj["meta"]`` becomes a :class:`CheckpointMeta`.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: not readable, not a covidscan checkpoint, another version, invalid
            metadata, or (``task`` given) a checkpoint of another task.
    """
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
    obj["meta"] = CheckpointMeta.from_dict(obj.get("meta") or {}, str(path))
    if obj.get("provenance") is not None and not valid_record(obj["provenance"]):
        raise CheckpointError(f"{path}: its record of the training images (provenance) is malformed")
    if task is not None and obj["meta"].task != task:
        raise CheckpointError(f"{path}: checkpoint is for task {obj['meta'].task!r}, not {task!r}")
    return obj


def model_from_checkpoint(obj: dict, path: str | Path = "<checkpoint>"):
    """Rebuild the model (eval mode) from a loaded checkpoint; returns ``(model, meta)``.

    Raises:
        CheckpointError: the weights do not fit the stored backbone and head.
    """
    meta: CheckpointMeta = obj["meta"]
    n = len(meta.class_names)
    what = " + ".join(f"{m['backbone']}+{m['head']}" for m in meta.members) if meta.members else f"{meta.backbone}+{meta.head}"
    try:
        if meta.members:
            model = build_ensemble(meta.members, n, meta.preprocess.image_size)
        else:
            model, _ = build_model(meta.backbone, meta.head, n, weights="none", dropout=meta.dropout)
    except (ValueError, KeyError) as exc:  # unknown backbone or head, a member record without one
        raise CheckpointError(f"{path}: {exc}") from None
    try:
        model.load_state_dict(obj["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: weights do not fit {what} ({str(exc)[:200]})") from exc
    return model.eval(), meta

"""Records that cross modules, strict JSON, and the one interval formatter. Imports no torch.

* :class:`EvaluationResult`: what ``covidscan evaluate`` measured (``metrics.json``), read by
  reports, the model card and ``reproduce``.
* :func:`write_json` / :func:`strict`: every JSON file covidscan writes is strict JSON
  (RFC 8259): an undefined metric (``nan``) is written as ``null``, never as ``NaN``, so
  JavaScript's ``JSON.parse`` and ``jq`` read it.
* :func:`fmt_interval`: ``"value [lo, hi]"`` in percent or as a fraction; ``n/a`` for undefined.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import IO


def strict(obj):
    """A copy of ``obj`` that ``json.dumps(..., allow_nan=False)`` accepts: non-finite floats -> None,
    numpy scalars and arrays, tuples, paths and objects with ``to_dict`` -> plain JSON types."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, dict):
        return {str(k): strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return strict(obj.to_dict())
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return strict(obj.tolist())
    if hasattr(obj, "item"):
        return strict(obj.item())
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def dumps(obj, **kw) -> str:
    """Strict JSON text of ``obj`` (see :func:`strict`)."""
    return json.dumps(strict(obj), allow_nan=False, **kw)


def write_json(obj, path: str | Path, *, indent: int = 2) -> Path:
    """Write strict JSON atomically (temporary file, then rename)."""
    return atomic_write(path, dumps(obj, indent=indent) + "\n")


def atomic_write(path: str | Path, data: bytes | str | Callable[[IO[bytes]], object]) -> Path:
    """Write ``data`` (bytes, text as UTF-8, or a function that writes to a binary file) to a temporary file
    beside ``path``, then rename it into place: a reader, or a run killed while writing, never sees half a
    file. The one atomic write of covidscan (JSON, checkpoints, cache entries, segmenter weights)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; an output file gets the usual permissions
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _undefined(v) -> bool:
    return v is None or (isinstance(v, float) and not math.isfinite(v))


def fmt_interval(value, ci=None, *, pct: bool = True, digits: int | None = None) -> str:
    """``0.947, (0.915, 0.974)`` -> ``"94.7 [91.5, 97.4]"`` (``pct``) or ``"0.947 [0.915, 0.974]"``.

    ``digits`` defaults to 1 in percent and 3 for fractions; an undefined value gives ``n/a``
    and an undefined interval is left out.
    """
    if _undefined(value):
        return "n/a"
    d = (1 if pct else 3) if digits is None else digits
    scale = 100.0 if pct else 1.0
    s = f"{value * scale:.{d}f}"
    if ci is not None and len(ci) == 2 and not any(_undefined(v) for v in ci):
        s += f" [{ci[0] * scale:.{d}f}, {ci[1] * scale:.{d}f}]"
    return s


@dataclass
class EvaluationResult:
    """A checkpoint's metrics on one set of images (``metrics.json``).

    ``metrics`` is :func:`covidscan.metrics.compute_metrics`'s output; ``ci95`` maps its
    flattened keys (``accuracy``, ``sensitivity/0``, ``macro_auroc`` ...) to 95% intervals.
    """

    checkpoint: str | None
    task: str
    class_names: list[str]
    backbone: str
    head: str
    weights_source: str
    trained_split_protocol: str | None
    evaluated_on: str
    grouping: str
    split_type: str
    counts: dict
    absent_classes: list[str]
    skipped: list[dict]
    metrics: dict
    ci95: dict
    bootstrap: dict
    ece: float
    reliability: dict
    threshold: dict | None = None  # the checkpoint's stored operating threshold, when it has one
    overlap: dict | None = None  # the evaluated images against the model's training record (covidscan.provenance)
    operating_points: dict | None = None  # COVID: sensitivity at 90/95% specificity and vice versa, with intervals
    grid: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def external(self) -> bool:
        """True only when the images were checked against the model's training record and none was seen."""
        return bool(self.overlap and self.overlap.get("external"))

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> EvaluationResult:
        names = {f.name for f in fields(cls)} - {"extra"}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = required - set(d)
        if missing:
            raise ValueError(f"not a covidscan evaluation result: lacks {sorted(missing)}")
        return cls(**{k: v for k, v in d.items() if k in names}, extra={k: v for k, v in d.items() if k not in names})

    @classmethod
    def read(cls, path: str | Path) -> EvaluationResult:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

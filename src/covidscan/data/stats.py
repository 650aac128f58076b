"""Dataset statistics: Berrimi et al. (2021) Tables I and II for any dataset.

Per class: image count, min / max / mean / standard deviation (population, ddof=0) of
width and height in pixels, and the formats and pixel modes found.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

from covidscan.data.io import PILLOW_FORMATS, ImageReadError, check_size, read_image
from covidscan.data.manifest import DatasetIndex, Record

logger = logging.getLogger(__name__)


@dataclass
class ClassStats:
    label: str
    count: int
    width: dict[str, float]
    height: dict[str, float]
    formats: dict[str, int]
    modes: dict[str, int]
    sources: dict[str, int]


@dataclass
class DatasetStats:
    task: str
    classes: list[ClassStats]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    size_kind: str = "stored"  # or "original"

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "size_kind": self.size_kind,
            "classes": [c.__dict__ for c in self.classes],
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
        }


def _summary(values: list[int]) -> dict[str, float]:
    if not values:
        return {"min": 0, "max": 0, "mean": 0.0, "std": 0.0}
    a = np.asarray(values, dtype=np.float64)
    return {"min": int(a.min()), "max": int(a.max()), "mean": float(a.mean()), "std": float(a.std())}


def _probe(record: Record) -> tuple[int, int, str, str]:
    """Width, height, format, mode; decodes fully so that truncated files are caught."""
    try:
        with Image.open(record.path, formats=PILLOW_FORMATS) as im:
            check_size(record.path, im.width, im.height, getattr(im, "n_frames", 1))
            im.load()
            return im.width, im.height, im.format or "unknown", im.mode
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        scan = read_image(record.path)  # DICOM, or raises ImageReadError with the cause
        return scan.width, scan.height, scan.format, scan.mode


def compute_stats(index: DatasetIndex, *, original: bool = False, strict: bool = False) -> DatasetStats:
    """Per-class statistics. Unreadable images are skipped and listed unless ``strict``.

    With ``original=True`` the manifest's ``original_width`` / ``original_height`` are used
    instead of the stored files' sizes (ValueError if the manifest lacks them).
    """
    per_class: dict[str, dict[str, list]] = {n: {"w": [], "h": [], "fmt": [], "mode": [], "src": []} for n in index.class_names}
    skipped: list[tuple[str, str]] = []
    original = original or index.packed is not None  # a pack keeps each file's size from when it was packed
    for rec in index.records:
        if original:
            try:
                w, h = int(rec.row["original_width"]), int(rec.row["original_height"])
            except (KeyError, ValueError, TypeError):
                raise ValueError(f"{rec.path}: --original needs original_width/original_height in the manifest") from None
            fmt, mode = rec.row.get("original_format", "?"), rec.row.get("original_mode", "?")
        else:
            try:
                w, h, fmt, mode = _probe(rec)
            except ImageReadError as exc:
                if strict:
                    raise
                skipped.append((str(rec.path), exc.cause))
                logger.warning("skipping unreadable image %s", exc)
                continue
        d = per_class[rec.label]
        d["w"].append(w)
        d["h"].append(h)
        d["fmt"].append(fmt)
        d["mode"].append(mode)
        d["src"].append(rec.source)
    classes = [
        ClassStats(
            label=n,
            count=len(d["w"]),
            width=_summary(d["w"]),
            height=_summary(d["h"]),
            formats=dict(Counter(d["fmt"]).most_common()),
            modes=dict(Counter(d["mode"]).most_common()),
            sources=dict(Counter(d["src"]).most_common()),
        )
        for n, d in per_class.items()
    ]
    return DatasetStats(task=index.task, classes=classes, skipped=skipped, size_kind="original" if original else "stored")


def format_stats(stats: DatasetStats) -> str:
    """A human-readable table in the layout of the paper's Tables I / II."""
    head = f"{'class':<10} {'images':>6}  {'width min/max/mean/std':>26}  {'height min/max/mean/std':>26}  formats / modes"
    lines = [f"task: {stats.task}   sizes: {stats.size_kind} (pixels)", head, "-" * len(head)]
    total = 0
    for c in stats.classes:
        total += c.count
        wd, ht = c.width, c.height
        w = f"{wd['min']}/{wd['max']}/{wd['mean']:.1f}/{wd['std']:.1f}"
        h = f"{ht['min']}/{ht['max']}/{ht['mean']:.1f}/{ht['std']:.1f}"
        fm = ", ".join(f"{k} {v}" for k, v in c.formats.items())
        md = ", ".join(f"{k} {v}" for k, v in c.modes.items())
        lines.append(f"{c.label:<10} {c.count:>6}  {w:>26}  {h:>26}  {fm} / {md}")
    lines.append(f"{'total':<10} {total:>6}")
    sources = sorted({s for c in stats.classes for s in c.sources})
    if len(sources) > 1 or any(len(c.sources) for c in stats.classes):
        lines.append("")
        lines.append("class x source:")
        for c in stats.classes:
            for s, n in c.sources.items():
                lines.append(f"  {c.label:<10} {n:>6}  {s}")
    if stats.skipped:
        lines.append("")
        lines.append(f"skipped {len(stats.skipped)} unreadable image(s):")
        lines += [f"  {p}: {r}" for p, r in stats.skipped]
    return "\n".join(lines)

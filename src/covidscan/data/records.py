"""What a dataset is made of: :class:`Record` (one image and its facts) and :class:`DatasetIndex` (the records
of one or several merged datasets of one task). Read by :mod:`covidscan.data.manifest` (CSV and folders) and
:mod:`covidscan.data.packed` (packed folders); imports neither.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from covidscan.labels import TASKS

MANIFEST_NAME = "manifest.csv"
PACKED_META = "packed.json"  # covidscan.data.packed: a folder holding it is a packed dataset


@dataclass(frozen=True)
class Record:
    """One image of a dataset. ``path`` is absolute; ``row`` keeps the manifest's columns."""

    path: Path
    label: str
    group_id: str | None = None
    patient_id: str | None = None
    source: str = ""
    dataset: str = ""
    row: dict = field(default_factory=dict, compare=False, hash=False, repr=False)
    packed_row: int | None = field(default=None, compare=False, hash=False, repr=False)  # row in a packed dataset

    def attribute(self, name: str) -> str:
        """The manifest column ``name`` of this record; when the manifest has no such column, a
        ``name=value`` entry of its free-text ``source_label`` (the shipped manifests write
        ``finding=...; view=AP; age=...`` there); "" when neither holds it."""
        value = str(self.row.get(name) or "").strip()
        if value:
            return value
        for part in str(self.row.get("source_label") or "").split(";"):
            key, eq, val = part.partition("=")
            if eq and key.strip().lower() == name.lower():
                return val.strip()
        return ""

    @property
    def group(self) -> str:
        """Key for leak-free splitting: group_id, else patient_id, else the image itself."""
        if self.group_id:
            return self.group_id
        if self.patient_id:
            return f"{self.dataset}:patient:{self.patient_id}"
        return f"image:{self.path}"


@dataclass
class DatasetIndex:
    """The records of one or several merged datasets of one task."""

    task: str
    records: list[Record]
    origins: list[Path]
    packed: object | None = None  # covidscan.data.packed.PackedImages when the records come from a pack

    @property
    def class_names(self) -> tuple[str, ...]:
        return TASKS[self.task]

    @property
    def grouping(self) -> str:
        """``"group_id"``, ``"patient_id"`` or ``"image"``: what splits can keep together."""
        if self.records and all(r.group_id for r in self.records):
            return "group_id"
        if self.records and all(r.group_id or r.patient_id for r in self.records):
            return "patient_id"
        return "image"

    def __len__(self) -> int:
        return len(self.records)

    def labels(self) -> list[str]:
        return [r.label for r in self.records]

    def targets(self) -> list[int]:
        names = self.class_names
        return [names.index(r.label) for r in self.records]

    def counts(self) -> dict[str, int]:
        c = Counter(self.labels())
        return {name: c.get(name, 0) for name in self.class_names}

    def sources(self) -> dict[str, dict[str, int]]:
        """``{label: {source: count}}`` for the class x source table."""
        out: dict[str, dict[str, int]] = {n: {} for n in self.class_names}
        for r in self.records:
            out[r.label][r.source] = out[r.label].get(r.source, 0) + 1
        return out

    def single_source_classes(self) -> list[str]:
        return [label for label, srcs in self.sources().items() if len(srcs) == 1]

    def fingerprint(self) -> str:
        """SHA-256 of the sorted (file, label, group) triples: identifies the data used."""
        h = hashlib.sha256()
        for line in sorted(f"{r.path.name},{r.label},{r.group}" for r in self.records):
            h.update(line.encode() + b"\n")
        return h.hexdigest()

    def subset(self, keep: Iterable[int]) -> DatasetIndex:
        return DatasetIndex(self.task, [self.records[i] for i in keep], self.origins, self.packed)

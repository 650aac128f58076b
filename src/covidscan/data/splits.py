"""Leak-free train / validation / test splits.

``grouped_split`` keeps every group (``Record.group``: group_id, else patient_id, else
the image) inside one split and stratifies by label (and optionally source), so class
proportions in each split follow the whole. The assignment is a greedy, deterministic
bin-packing: groups are visited largest first (ties broken by a seeded shuffle) and each
goes to the split whose per-stratum counts it brings closest to their targets.

``paper_split`` is Berrimi et al.'s protocol: an image-level stratified 80/20
train/test split (scikit-learn ``train_test_split``), validation carved from train. It
leaks patients; use it only to reproduce the paper.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covidscan.data.manifest import DatasetIndex, load_dataset

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
PROTOCOL_GROUPED = "grouped"
PROTOCOL_PAPER = "paper-image-level"
PROTOCOL_IMAGE = "image-level"


@dataclass
class Split:
    """``assignment[i]`` is the split name of ``index.records[i]``."""

    index: DatasetIndex
    assignment: list[str]
    protocol: str

    def indices(self, name: str) -> list[int]:
        return [i for i, s in enumerate(self.assignment) if s == name]

    def subset(self, name: str) -> DatasetIndex:
        return self.index.subset(self.indices(name))

    def audit(self, tolerance: float = 0.02) -> list[str]:
        """Problems found: groups crossing splits, class proportions off by > tolerance."""
        problems = []
        where: dict[str, set[str]] = defaultdict(set)
        for rec, s in zip(self.index.records, self.assignment, strict=True):
            where[rec.group].add(s)
        crossing = [g for g, ss in where.items() if len(ss) > 1]
        if crossing:
            problems.append(f"{len(crossing)} group(s) in more than one split, e.g. {crossing[0]}")
        whole = Counter(self.index.labels())
        n = len(self.index)
        for s in SPLITS:
            idx = self.indices(s)
            if not idx:
                continue
            part = Counter(self.index.records[i].label for i in idx)
            for label in self.index.class_names:
                diff = part.get(label, 0) / len(idx) - whole.get(label, 0) / n
                if abs(diff) > tolerance:
                    problems.append(f"{s}: {label} proportion off by {diff * 100:+.1f} points")
        return problems

    def counts(self) -> dict[str, dict[str, int]]:
        out = {}
        for s in SPLITS:
            c = Counter(self.index.records[i].label for i in self.indices(s))
            out[s] = {label: c.get(label, 0) for label in self.index.class_names}
            out[s]["groups"] = len({self.index.records[i].group for i in self.indices(s)})
        return out

    def format_counts(self) -> str:
        names = self.index.class_names
        lines = [
            f"protocol: {self.protocol}   grouping: {self.index.grouping}",
            f"{'split':<6} " + " ".join(f"{n:>10}" for n in names) + f" {'total':>7} {'groups':>7}",
        ]
        for s, c in self.counts().items():
            tot = sum(c[n] for n in names)
            lines.append(f"{s:<6} " + " ".join(f"{c[n]:>10}" for n in names) + f" {tot:>7} {c['groups']:>7}")
        return "\n".join(lines)


def grouped_split(index: DatasetIndex, *, test: float = 0.2, val: float = 0.1, seed: int = 0, by_source: bool = True) -> Split:
    """Stratified (label, and source when ``by_source``) split that keeps groups whole."""
    _check_fractions(test, val)
    fractions = {"train": 1.0 - test - val, "val": val, "test": test}
    strata = [(r.label, r.source if by_source else "") for r in index.records]
    keys = sorted(set(strata))
    kpos = {k: j for j, k in enumerate(keys)}
    groups: dict[str, list[int]] = defaultdict(list)
    for i, rec in enumerate(index.records):
        groups[rec.group].append(i)
    names = sorted(groups)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(names))
    # largest groups first; the seeded permutation breaks ties
    visit = sorted(order, key=lambda k: -len(groups[names[k]]))
    total = np.zeros(len(keys))
    for s in strata:
        total[kpos[s]] += 1
    split_names = [s for s in SPLITS if fractions[s] > 0]
    target = np.stack([total * fractions[s] for s in split_names])  # S x K
    have = np.zeros_like(target)
    assignment = [""] * len(index)
    for k in visit:
        members = groups[names[k]]
        vec = np.zeros(len(keys))
        for i in members:
            vec[kpos[strata[i]]] += 1
        # the increase in squared shortfall-overrun each split would see, scaled by target
        scale = np.maximum(target, 1.0)
        cost = (((have + vec - target) ** 2 - (have - target) ** 2) / scale).sum(axis=1)
        best = int(np.argmin(cost))
        have[best] += vec
        for i in members:
            assignment[i] = split_names[best]
    # tiny data sets: a split asked for but left empty gets the smallest group from train
    for name in split_names[1:]:
        if name not in assignment:
            donors = [k for k in reversed(visit) if assignment[groups[names[k]][0]] == "train"]
            if len(donors) > 1:
                for i in groups[names[donors[0]]]:
                    assignment[i] = name
    protocol = PROTOCOL_GROUPED if index.grouping != "image" else PROTOCOL_IMAGE
    if index.grouping == "image":
        logger.warning(
            "no group_id or patient_id: this split is image-level, so images of one patient "
            "may sit in train and test and results will be optimistic"
        )
    return Split(index, assignment, protocol)


def paper_split(index: DatasetIndex, *, test: float = 0.2, val: float = 0.1, seed: int = 0) -> Split:
    """Berrimi et al.'s image-level stratified split (leaks patients; reproduction only)."""
    # imported here: scikit-learn takes about a second to import, and `covidscan split` / `stats`
    # on the grouped protocol never need it
    from sklearn.model_selection import train_test_split

    _check_fractions(test, val)
    idx = np.arange(len(index))
    y = index.labels()
    rest, te = train_test_split(idx, test_size=test, stratify=y, random_state=seed)
    assignment = ["test"] * len(index)
    if val > 0:
        tr, va = train_test_split(rest, test_size=val / (1 - test), stratify=[y[i] for i in rest], random_state=seed)
        for i in va:
            assignment[i] = "val"
    else:
        tr = rest
    for i in tr:
        assignment[i] = "train"
    return Split(index, assignment, PROTOCOL_PAPER)


def _check_fractions(test: float, val: float) -> None:
    if not (0 < test < 1) or not (0 <= val < 1) or test + val >= 1:
        raise ValueError(f"need 0 < test < 1, 0 <= val < 1 and test + val < 1; got test={test}, val={val}")


def write_split(split: Split, out: str | Path) -> Path:
    """Write the manifest with ``split`` and ``protocol`` columns; ``file`` relative to ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = out.parent.resolve()
    extra_cols: list[str] = []
    for r in split.index.records:
        for k in r.row:
            if k not in extra_cols and k not in (
                "file",
                "label",
                "group_id",
                "patient_id",
                "source",
                "split",
                "protocol",
                "packed",
            ):
                extra_cols.append(k)
    packed = any(r.packed_row is not None for r in split.index.records)
    cols = [
        "file",
        "label",
        "split",
        "group_id",
        "patient_id",
        "source",
        "protocol",
        *(["packed"] if packed else []),
        *extra_cols,
    ]
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r, s in zip(split.index.records, split.assignment, strict=True):
            row = {k: r.row.get(k, "") for k in extra_cols}
            row.update(
                file=os.path.relpath(r.path, base),
                label=r.label,
                split=s,
                group_id=r.group_id or "",
                patient_id=r.patient_id or "",
                source=r.source,
                protocol=split.protocol,
            )
            if r.packed_row is not None:  # relative like file, so a run folder moved with its pack still resumes
                row.update(packed=os.path.relpath(r.row["packed"], base), packed_row=r.packed_row)
            w.writerow(row)
    os.replace(tmp, out)
    return out


def read_split(path: str | Path, task: str | None = None) -> Split:
    """Read a split file written by :func:`write_split` (itself a manifest)."""
    index = load_dataset(path, task)
    assignment = [r.row.get("split", "") for r in index.records]
    bad = sorted({s for s in assignment if s not in SPLITS})
    if bad:
        raise ValueError(f"{path}: split column must be train/val/test; found {bad}")
    protocols = {r.row.get("protocol", "") for r in index.records} - {""}
    protocol = protocols.pop() if len(protocols) == 1 else PROTOCOL_GROUPED
    return Split(index, assignment, protocol)

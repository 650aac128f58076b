"""Datasets as lists of records: from a manifest CSV or a folder-per-class tree.

Two ways in (torchxrayvision / ImageFolder conventions):

* a manifest CSV with columns ``file,label`` and optional ``patient_id``, ``group_id``,
  ``source``; ``file`` is relative to the CSV's folder (or absolute);
* a folder ``ROOT/<label>/*`` (ImageFolder). A folder that holds a ``manifest.csv`` is
  always read through it, so ``DATA`` and ``DATA/manifest.csv`` give the same records,
  groups and sources.

Several datasets can be merged; each record keeps its ``source`` (the manifest's
``source`` column, else ``source_repo``, else the dataset folder's name).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from covidscan.data.io import is_image_file
from covidscan.data.records import MANIFEST_NAME, PACKED_META, DatasetIndex, Record
from covidscan.errors import DataError
from covidscan.labels import TASKS, check_label

logger = logging.getLogger(__name__)


def infer_task(labels: Iterable[str]) -> str:
    """``xray`` if any label is ``pneumonia`` or outside the CT classes, else ``ct``."""
    found = set(labels)
    return "ct" if found <= set(TASKS["ct"]) else "xray"


def _clean(value: str | None) -> str | None:
    value = (value or "").strip()
    return value or None


def read_manifest(csv_path: Path) -> list[Record]:
    """Read a manifest CSV; every listed file must exist (else FileNotFoundError)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: manifest not found")
    root = csv_path.parent
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:  # utf-8-sig: spreadsheets often add a BOM
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        missing_cols = {"file", "label"} - set(fields)
        if missing_cols:
            raise DataError(f"{csv_path}: manifest lacks column(s) {sorted(missing_cols)}; need at least file,label")
        rows = list(reader)
    if not rows:
        raise DataError(f"{csv_path}: manifest has no rows")
    records, missing = [], []
    for n, row in enumerate(rows, start=2):
        rel = _clean(row.get("file"))
        label = _clean(row.get("label"))
        if not rel or not label:
            raise DataError(f"{csv_path}:{n}: empty file or label")
        path = (root / rel).resolve() if not Path(rel).is_absolute() else Path(rel)
        packed = _clean(row.get("packed"))  # a split of a packed dataset: the image is a row of the pack
        if packed:
            row = {**row, "packed": str((root / packed).resolve())}
        elif not path.is_file():
            missing.append(f"{rel} (line {n})")
            continue
        source = _clean(row.get("source")) or _clean(row.get("source_repo")) or root.name
        records.append(
            Record(
                path=path,
                label=label,
                group_id=_clean(row.get("group_id")),
                patient_id=_clean(row.get("patient_id")),
                source=source,
                dataset=_clean(row.get("dataset")) or root.name,
                row=dict(row),
                packed_row=int(row["packed_row"]) if packed else None,
            )
        )
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        hint = ""
        if len(missing) == len(rows) and not any(Path(r.get("file", "")).is_absolute() for r in rows):
            hint = f" (paths are relative to {root}: was this folder moved away from the data?)"
        raise FileNotFoundError(f"{csv_path}: {len(missing)} listed file(s) missing: {shown}{hint}")
    return records


def read_folder(root: Path, task: str | None = None) -> list[Record]:
    """Read ``ROOT/<label>/*``; hidden entries and non-image suffixes are ignored."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root}: no class sub-folders and no {MANIFEST_NAME}; expected ROOT/<label>/<images>")
    allowed = set(TASKS[task]) if task else set().union(*TASKS.values())
    for d in class_dirs:
        if d.name not in allowed:
            raise DataError(f"{d}: unknown label {d.name!r}; allowed labels: {', '.join(sorted(allowed))}")
    records = []
    for d in class_dirs:
        files = sorted(p for p in d.rglob("*") if p.is_file() and not p.name.startswith(".") and is_image_file(p))
        if not files:
            raise DataError(f"{d}: class folder {d.name!r} holds no image files")
        records += [Record(path=p.resolve(), label=d.name, source=root.name, dataset=root.name) for p in files]
    return records


def load_dataset(data: str | Path | Sequence[str | Path], task: str | None = None) -> DatasetIndex:
    """Load one or several datasets (folders or manifests) into a :class:`DatasetIndex`.

    ``task`` defaults to :func:`infer_task` on the labels found. Every label must belong to
    the task; datasets that disagree raise ``ValueError``.
    """
    paths = [Path(data)] if isinstance(data, (str, Path)) else [Path(d) for d in data]
    if not paths:
        raise DataError("no dataset given")
    records: list[Record] = []
    opened: dict[str, object] = {}  # packed folders read here: their records need no second read and check
    tasks_seen: dict[Path, str] = {}
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file or folder")
        if p.is_file():
            recs = read_manifest(p)
        elif (p / PACKED_META).is_file():
            from covidscan.data.packed import read_packed

            recs, images = read_packed(p)
            opened[str(images.folder)] = images
        elif (p / MANIFEST_NAME).is_file():
            recs = read_manifest(p / MANIFEST_NAME)
        else:
            recs = read_folder(p, task)
        tasks_seen[p] = task or infer_task(r.label for r in recs)
        records += recs
    task = task or infer_task(r.label for r in records)
    for p, t in tasks_seen.items():
        if t != task:
            raise DataError(f"{p}: its classes are those of task {t!r}, the others' are {task!r}; cannot merge")
    for r in records:
        try:
            check_label(r.label, task)
        except ValueError as exc:
            raise DataError(f"{r.path}: {exc}") from None
    seen: set[Path] = set()
    dupes = [r.path for r in records if r.path in seen or seen.add(r.path)]
    if dupes:
        raise DataError(f"{dupes[0]}: listed more than once ({len(dupes)} duplicate rows)")
    return DatasetIndex(task=task, records=records, origins=paths, packed=_open_pack(records, opened))


def exclude_sources(index: DatasetIndex, terms: str) -> DatasetIndex:
    """``index`` without the images whose source name contains one of the comma-separated ``terms``
    (case-insensitive): ``"kermany"`` drops the pediatric Kermany films whatever their mirror is called.

    Raises:
        DataError: a term matches no source, or nothing is left.
    """
    words = [t.strip().lower() for t in terms.split(",") if t.strip()]
    if not words:
        return index
    sources = sorted({r.source for r in index.records})
    unused = [w for w in words if not any(w in s.lower() for s in sources)]
    if unused:
        raise DataError(f"data.exclude={terms!r}: {', '.join(unused)} matches no source; sources: {'; '.join(sources)}")
    keep = [i for i, r in enumerate(index.records) if not any(w in r.source.lower() for w in words)]
    if not keep:
        raise DataError(f"data.exclude={terms!r} leaves no image")
    return index.subset(keep)


def _open_pack(records: list[Record], opened: dict | None = None):
    """The pack the records come from (None for files); every record must come from one pack, with
    the label and key the pack gives that row (else a split or manifest and the pack disagree)."""
    packs = {r.row["packed"] for r in records if r.packed_row is not None}
    if not packs:
        return None
    if len(packs) > 1 or any(r.packed_row is None for r in records):
        raise DataError(
            "a packed dataset cannot be merged with other data or packs; pack them together: covidscan pack A B --out P"
        )
    from covidscan.data.packed import read_packed

    folder = packs.pop()
    if opened and folder in opened:  # the records were just read from this pack
        return opened[folder]
    own, images = read_packed(folder)
    for r in records:
        if r.packed_row >= len(own) or own[r.packed_row].path != r.path or own[r.packed_row].label != r.label:
            raise DataError(
                f"{r.path} ({r.label}): row {r.packed_row} of the pack {folder} holds another image or label; "
                "the pack changed since this list was written"
            )
    return images

"""Writing a packed dataset (``covidscan pack``): decode and preprocess every image once into shards.

The layout and the reader are in :mod:`covidscan.data.packed`; this module only writes it.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from covidscan.data.io import ImageReadError, read_bytes
from covidscan.data.manifest import load_dataset
from covidscan.data.packed import FORMAT, INDEX_FIELDS, INDEX_NAME, META_NAME, VERSION, _header
from covidscan.data.records import DatasetIndex, Record
from covidscan.data.transforms import Preprocess, to_gray_uint8
from covidscan.errors import DataError


@dataclass
class PackResult:
    out: Path
    images: int
    skipped: list[tuple[str, str]]
    seconds: float
    bytes: int

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def _keys(index: DatasetIndex) -> list[str]:
    """Unique keys for the records: their paths relative to the common folder of all of them."""
    paths = [str(r.path) for r in index.records]
    common = os.path.commonpath(paths) if len(paths) > 1 else str(Path(paths[0]).parent)
    return [os.path.relpath(p, common) for p in paths]


def _decode(rec: Record, pre: Preprocess) -> tuple[np.ndarray, dict] | ImageReadError:
    """The preprocessed ``S x S`` image and the file's own facts (size, format, mode: for ``stats``)."""
    try:
        data = rec.path.read_bytes()
    except OSError as exc:
        return ImageReadError(rec.path, f"cannot read file ({exc})")
    try:
        scan = read_bytes(data, name=str(rec.path))
        facts = {"width": scan.width, "height": scan.height, "format": scan.format, "mode": scan.mode}
        return to_gray_uint8(scan, pre)[0].numpy(), facts
    except ImageReadError as exc:
        return exc


def pack(
    data,
    out: str | Path,
    pre: Preprocess,
    *,
    task: str | None = None,
    shard_images: int = 4096,
    workers: int | None = None,
    progress: bool = False,
    overwrite: bool = False,
) -> PackResult:
    """Decode and preprocess every image of ``data`` (folders / manifests) once into ``out``.

    Images are decoded in a thread pool (decoding and resizing release the GIL) and written in
    dataset order, ``shard_images`` per shard. The pack is built in a temporary folder beside
    ``out`` and renamed into place when complete, so an interrupted pack leaves nothing half made.
    Unreadable images are listed in ``skipped.csv`` and left out.

    Raises:
        DataError: ``out`` exists (without ``overwrite``), ``data`` is itself packed, or no image is readable.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise DataError(f"{out} exists; choose another --out or pass --overwrite")
    index = load_dataset(data, task)
    if index.packed is not None:
        raise DataError(f"{', '.join(map(str, index.origins))}: already packed")
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    pack_id, key = uuid.uuid4().hex, pre.cache_key()
    keys = _keys(index)
    skipped: list[tuple[str, str]] = []
    shards: list[dict] = []
    rows: list[dict] = []
    fh = None
    bar = tqdm(total=len(index), desc=f"pack {pre.image_size}px", unit="img", disable=not progress)
    try:
        with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
            for rec, k, got in zip(index.records, keys, pool.map(lambda r: _decode(r, pre), index.records)):
                bar.update()
                if isinstance(got, ImageReadError):
                    skipped.append((str(rec.path), got.cause))
                    continue
                img, facts = got
                if fh is None or shards[-1]["count"] == shard_images:
                    if fh is not None:
                        fh.close()
                    shards.append({"file": f"shard-{len(shards):05d}.u8", "count": 0})
                    fh = open(tmp / shards[-1]["file"], "wb")
                    fh.write(_header(pack_id, len(shards) - 1, key, 0))
                fh.write(np.ascontiguousarray(img).tobytes())
                shards[-1]["count"] += 1
                rows.append(
                    {
                        "key": k, "label": rec.label, "group_id": rec.group_id or "", "patient_id": rec.patient_id or "",
                        "source": rec.source, "dataset": rec.dataset, "row": len(rows), **facts,
                    }
                )  # fmt: skip
        if fh is not None:
            fh.close()
            fh = None
        if not rows:
            raise DataError("no readable image to pack")
        for k, sh in enumerate(shards):  # the final count goes into each header
            with open(tmp / sh["file"], "r+b") as f:
                f.write(_header(pack_id, k, key, sh["count"]))
        with open(tmp / INDEX_NAME, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=INDEX_FIELDS)
            w.writeheader()
            w.writerows(rows)
        if skipped:
            with open(tmp / "skipped.csv", "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows([("file", "reason"), *skipped])
        meta = {
            "format": FORMAT, "version": VERSION, "pack_id": pack_id, "task": index.task,
            "class_names": list(index.class_names), "image_size": pre.image_size, "preprocess": pre.to_dict(),
            "preprocess_key": key, "images": len(rows), "skipped": len(skipped), "shards": shards,
            "origins": [str(o) for o in index.origins], "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }  # fmt: skip
        (tmp / META_NAME).write_text(json.dumps(meta, indent=1))
        if out.exists():
            shutil.rmtree(out)
        tmp.chmod(0o755)  # mkdtemp made it private
        os.replace(tmp, out)
    except BaseException:
        if fh is not None:
            fh.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    nbytes = sum(p.stat().st_size for p in out.iterdir())
    return PackResult(out, len(rows), skipped, time.perf_counter() - t0, nbytes)

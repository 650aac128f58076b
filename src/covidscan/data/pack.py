"""Writing a packed dataset (``covidscan pack``): decode and preprocess every image once into shards.

The layout and the reader are in :mod:`covidscan.data.packed`; this module only writes it.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
import zlib
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

logger = logging.getLogger(__name__)


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


class _ShardWriter:
    """Images appended in order, ``per_shard`` to a shard file; a header with the final count is written last."""

    def __init__(self, folder: Path, pack_id: str, key: str, per_shard: int):
        self.folder, self.pack_id, self.key, self.per_shard = folder, pack_id, key, per_shard
        self.shards: list[dict] = []
        self.fh = None

    def add(self, img: np.ndarray) -> int:
        """Append one ``S x S`` uint8 image; returns its CRC-32 (stored in the index, checked on read)."""
        if self.fh is None or self.shards[-1]["count"] == self.per_shard:
            self.close()
            self.shards.append({"file": f"shard-{len(self.shards):05d}.u8", "count": 0})
            self.fh = open(self.folder / self.shards[-1]["file"], "wb")
            self.fh.write(_header(self.pack_id, len(self.shards) - 1, self.key, 0))
        data = np.ascontiguousarray(img).tobytes()
        self.fh.write(data)
        self.shards[-1]["count"] += 1
        return zlib.crc32(data)

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None

    def finish(self) -> list[dict]:
        self.close()
        for k, sh in enumerate(self.shards):  # the final count goes into each header
            with open(self.folder / sh["file"], "r+b") as f:
                f.write(_header(self.pack_id, k, self.key, sh["count"]))
        return self.shards


def _write_tables(folder: Path, rows: list[dict], skipped: list[tuple[str, str]], meta: dict) -> None:
    with open(folder / INDEX_NAME, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=INDEX_FIELDS)
        w.writeheader()
        w.writerows(rows)
    if skipped:
        with open(folder / "skipped.csv", "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([("file", "reason"), *skipped])
    (folder / META_NAME).write_text(json.dumps(meta, indent=1))


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove the temporary folders (``.NAME.*.tmp`` beside ``out``) that a killed ``pack`` left behind."""
    stale = [p for p in out.parent.glob(f".{out.name}.*.tmp") if p.is_dir()]
    for p in stale:
        logger.info("removing %s, left by an interrupted pack", p)
        shutil.rmtree(p, ignore_errors=True)
    return stale


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
    dataset order, ``shard_images`` per shard, each with a CRC-32 in the index. The pack is built in a
    temporary folder beside ``out`` and renamed into place when complete, so an interrupted pack leaves
    nothing half made (and the next run removes what it left). Unreadable images are listed in
    ``skipped.csv`` and left out.

    Raises:
        DataError: ``out`` exists (without ``overwrite``) or is a file, ``data`` is itself packed, or no image is readable.
    """
    out = Path(out)
    if out.exists() and (not overwrite or not out.is_dir()):
        raise DataError(
            f"{out} exists{'' if out.is_dir() else ' and is a file'}; choose another --out"
            + ("" if not out.is_dir() else " or pass --overwrite")
        )
    index = load_dataset(data, task)
    if index.packed is not None:
        raise DataError(f"{', '.join(map(str, index.origins))}: already packed")
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    pack_id, key = uuid.uuid4().hex, pre.cache_key()
    writer = _ShardWriter(tmp, pack_id, key, shard_images)
    skipped: list[tuple[str, str]] = []
    rows: list[dict] = []
    bar = tqdm(total=len(index), desc=f"pack {pre.image_size}px", unit="img", disable=not progress)
    try:
        with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
            for rec, k, got in zip(index.records, _keys(index), pool.map(lambda r: _decode(r, pre), index.records)):
                bar.update()
                if isinstance(got, ImageReadError):
                    skipped.append((str(rec.path), got.cause))
                    logger.warning("skipping unreadable image %s", got)
                    continue
                img, facts = got
                rows.append({
                    "key": k, "label": rec.label, "group_id": rec.group_id or "", "patient_id": rec.patient_id or "",
                    "source": rec.source, "dataset": rec.dataset, "row": len(rows), **facts, "crc32": writer.add(img),
                })  # fmt: skip
        shards = writer.finish()
        if not rows:
            raise DataError("no readable image to pack")
        meta = {
            "format": FORMAT, "version": VERSION, "pack_id": pack_id, "task": index.task,
            "class_names": list(index.class_names), "image_size": pre.image_size, "preprocess": pre.to_dict(),
            "preprocess_key": key, "images": len(rows), "skipped": len(skipped), "shards": shards,
            "origins": [str(o) for o in index.origins], "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }  # fmt: skip
        _write_tables(tmp, rows, skipped, meta)
        if out.exists():
            shutil.rmtree(out)
        tmp.chmod(0o755)  # mkdtemp made it private
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    nbytes = sum(p.stat().st_size for p in out.iterdir())
    return PackResult(out, len(rows), skipped, time.perf_counter() - t0, nbytes)

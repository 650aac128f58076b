"""Packed datasets: decode and preprocess once, then stream the ``uint8`` images from disk.

``covidscan pack DATA... --out PACKED`` writes (:mod:`covidscan.data.pack`)::

    PACKED/packed.json       format, task, preprocessing key, image size, shards (images, bytes)
    PACKED/index.csv         one row per image: key, label, group_id, patient_id, source, dataset, row
    PACKED/shard-00000.u8    a 4 KiB header (format, pack id, preprocessing key), then N x S x S uint8
    PACKED/skipped.csv       images that could not be read, with the reason (only when there are some)

Why fixed-size raw records rather than WebDataset tar shards or LitData chunks (both compared in
``docs/results/performance.md``): the images are already decoded, resized and 8-bit, so an item
is one ``os.pread`` at ``header + row * S * S`` with nothing to decode; random access keeps the
training loop's map-style dataset, so the seeded epoch order, its exact division across
processes and workers (:func:`covidscan.training.data.rank_share`) and mid-epoch resume work unchanged;
and it needs no new dependency. ``pread`` rather than ``mmap``: pages read stay in the OS page
cache, not in the process's resident memory, so RSS stays flat however large the pack.

A packed folder is a dataset like any other: ``load_dataset(PACKED)`` gives its records (labels,
groups, sources) and ``DatasetIndex.packed`` the images; splits by group work as on the
original files. Shards are named relative to the folder, so a pack can be moved or copied to
another machine. A truncated shard, a shard of another pack or preprocessing setting, or an
index that does not match the metadata is a :class:`~covidscan.errors.DataError` naming the file.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from covidscan.data.records import Record
from covidscan.data.transforms import Preprocess
from covidscan.errors import DataError

logger = logging.getLogger(__name__)

META_NAME = "packed.json"
INDEX_NAME = "index.csv"
FORMAT = "covidscan-packed"
VERSION = 1
HEADER = 4096  # bytes before the first image of a shard (JSON, space padded): page aligned
INDEX_FIELDS = (
    "key", "label", "group_id", "patient_id", "source", "dataset", "row", "width", "height", "format", "mode", "crc32",
)  # fmt: skip


def is_packed(path: str | Path) -> bool:
    """True for a folder written by :func:`pack`."""
    return (Path(path) / META_NAME).is_file()


def _header(pack_id: str, shard: int, key: str, count: int) -> bytes:
    text = json.dumps(
        {"format": FORMAT, "version": VERSION, "pack_id": pack_id, "shard": shard, "preprocess": key, "count": count}
    )
    return text.encode().ljust(HEADER, b" ")


class PackedImages:
    """The images of a packed folder: ``packed[row]`` is a ``1 x S x S`` uint8 tensor.

    Opening checks every shard's size and header against ``packed.json``. Files are opened
    lazily in each process (DataLoader workers open their own) and read with ``os.pread``.

    Raises:
        DataError: missing or unreadable metadata, a missing or truncated shard, a shard of
            another pack or preprocessing setting.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).resolve()
        meta_path = self.folder / META_NAME
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"{meta_path}: not a readable packed dataset ({exc})") from None
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise DataError(f"{meta_path}: not a covidscan packed dataset of version {VERSION}")
        self.meta = meta
        self.size = int(meta["image_size"])
        self.preprocess = Preprocess.from_dict(meta["preprocess"])
        self.key = meta["preprocess_key"]
        self.item_bytes = self.size * self.size
        self.shards: list[Path] = []
        starts = [0]
        for k, sh in enumerate(meta["shards"]):
            path = self.folder / sh["file"]
            expected = HEADER + sh["count"] * self.item_bytes
            if not path.is_file():
                raise DataError(f"{path}: shard missing from the packed dataset")
            found = path.stat().st_size
            if found != expected:
                raise DataError(f"{path}: truncated or damaged shard ({found} bytes, expected {expected}); pack again")
            with open(path, "rb") as fh:
                head = fh.read(HEADER)
            try:
                h = json.loads(head.decode().strip())
            except ValueError:
                raise DataError(f"{path}: shard header unreadable; pack again") from None
            if h.get("pack_id") != meta["pack_id"] or h.get("shard") != k or h.get("preprocess") != self.key:
                raise DataError(
                    f"{path}: shard of another pack or preprocessing setting "
                    f"(its preprocessing {h.get('preprocess')!r}, this pack's {self.key!r}); pack again"
                )
            self.shards.append(path)
            starts.append(starts[-1] + sh["count"])
        self.starts = np.asarray(starts, dtype=np.int64)
        counts = [sh["count"] for sh in meta["shards"]]
        self.per_shard = counts[0] if all(c == counts[0] for c in counts[:-1]) else 0  # 0: look rows up
        self._fds: dict[int, int] = {}
        self._pid = -1
        self.crc: np.ndarray | None = None  # CRC-32 of each row's bytes (index.csv), checked on every read

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self):  # DataLoader workers: open the shards again in the new process
        state = dict(self.__dict__)
        state["_fds"], state["_pid"] = {}, -1
        return state

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.shards[shard], os.O_RDONLY)
        return fd

    def read_into(self, row: int, out: torch.Tensor) -> torch.Tensor:
        """Read row ``row`` into the contiguous ``S x S`` (or ``1 x S x S``) uint8 tensor ``out`` (one ``preadv``)."""
        row = int(row)
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} outside the pack's {len(self)} images")
        if self.per_shard:
            shard, k = divmod(row, self.per_shard)
        else:
            shard = int(np.searchsorted(self.starts, row, side="right") - 1)
            k = row - int(self.starts[shard])
        got = os.preadv(self._fd(shard), [out.numpy()], HEADER + k * self.item_bytes)
        if got != self.item_bytes:
            raise DataError(f"{self.shards[shard]}: short read at row {row}; the shard changed since it was opened")
        if self.crc is not None and zlib.crc32(out.numpy()) != int(self.crc[row]):
            raise DataError(
                f"{self.shards[shard]}: row {row} (image {k} of the shard) does not match its checksum: the pack is "
                "damaged; pack again (covidscan pack --verify PACKED checks every row)"
            )
        return out

    def verify(self) -> list[int]:
        """Rows whose bytes do not match their checksum (every row read once); raises DataError for a pack
        written without checksums."""
        if self.crc is None:
            raise DataError(f"{self.folder}: packed before rows had checksums; pack again to be able to verify it")
        bad, buf = [], torch.empty((1, self.size, self.size), dtype=torch.uint8)
        for row in range(len(self)):
            try:
                self.read_into(row, buf)
            except DataError:
                bad.append(row)
        return bad

    def __getitem__(self, row: int) -> torch.Tensor:
        """Row ``row`` as a ``1 x S x S`` uint8 tensor."""
        return self.read_into(row, torch.empty((1, self.size, self.size), dtype=torch.uint8))

    def read(self, row: int) -> np.ndarray:
        """Row ``row`` as an ``S x S`` uint8 array."""
        return self[row][0].numpy()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


class PackedRows:
    """``images[k]`` of a :class:`PackedStore`: row ``rows[k]`` of the pack; a list, array or
    tensor of positions gives an ``N x 1 x S x S`` batch (read one by one, never the whole pack)."""

    def __init__(self, packed: PackedImages, rows: list[int]):
        self.packed, self.rows = packed, list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k):
        if isinstance(k, torch.Tensor) and k.dtype == torch.bool:
            k = torch.nonzero(k).flatten()
        if isinstance(k, np.ndarray) and k.dtype == bool:
            k = np.flatnonzero(k)
        if isinstance(k, (list, tuple, np.ndarray, torch.Tensor)):
            s = self.packed.size
            out = torch.empty((len(k), 1, s, s), dtype=torch.uint8)
            for j, i in enumerate(k):  # each image read straight into its place in the batch
                self.packed.read_into(self.rows[int(i)], out[j])
            return out
        return self.packed[self.rows[k]]


class PackedStore:
    """The streamed counterpart of :class:`~covidscan.data.dataset.ImageStore` (same attributes):
    ``images[i]`` reads ``records[i]`` from the pack on demand.

    Raises:
        DataError: the pack was made with other preprocessing than ``pre`` (its key differs).
    """

    def __init__(self, packed: PackedImages, records: list[Record], pre: Preprocess):
        if packed.key != pre.cache_key():
            raise DataError(
                f"{packed.folder} was packed with preprocessing {packed.key!r}; this model needs {pre.cache_key()!r} "
                f"(image size {pre.image_size}): pack again with those settings, or train with the pack's"
            )
        self.pre, self.size, self.records, self.hits = pre, pre.image_size, records, 0
        self.images = PackedRows(packed, [r.packed_row for r in records])
        self.valid = np.ones(len(records), dtype=bool)
        self.skipped: list[tuple[str, str]] = []


def read_packed(folder: str | Path) -> tuple[list[Record], PackedImages]:
    """The records and images of a packed folder (see the module docstring).

    Raises:
        DataError: the index is missing, unreadable or does not match the shards.
    """
    images = PackedImages(folder)
    path = images.folder / INDEX_NAME
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise DataError(f"{path}: index of the packed dataset unreadable ({exc})") from None
    if len(rows) != len(images) or any(int(r["row"]) != i for i, r in enumerate(rows)):
        raise DataError(f"{path}: the index lists {len(rows)} images, the shards hold {len(images)}; pack again")
    if rows and rows[0].get("crc32"):
        images.crc = np.asarray([int(r["crc32"]) for r in rows], dtype=np.uint32)
    records = [
        Record(
            path=images.folder / r["key"],
            label=r["label"],
            group_id=r["group_id"] or None,
            patient_id=r["patient_id"] or None,
            source=r["source"],
            dataset=r["dataset"],
            row={
                "packed": str(images.folder),
                "packed_row": r["row"],
                "original_width": r["width"],
                "original_height": r["height"],
                "original_format": r["format"],
                "original_mode": r["mode"],
            },  # fmt: skip
            packed_row=int(r["row"]),
        )
        for r in rows
    ]
    return records, images

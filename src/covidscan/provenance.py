"""What a model was trained on, and whether the images it is now scored on are among them.

Training stores, inside every checkpoint (``obj["provenance"]``), one record per training and
validation image, made from the decoded, preprocessed image (the ``1 x S x S`` uint8 the model saw):

* ``hash``: the first 8 bytes of the SHA-256 of those pixels, as an int64 (the same file under
  another name, or re-encoded losslessly, hashes the same);
* ``thumb``: a 32 x 32 grey thumbnail, z-normalised, stored as int8 (``round(z * 32)``, clipped):
  1 KiB per image. Two images whose thumbnails correlate at :data:`NEAR` (0.95) or more are called
  near-duplicates, the rule ``../shared/data/README.md`` uses against the same film stored twice
  under other names and sizes in public COVID collections;
* ``subset``: 0 = training split, 1 = validation split.

:func:`overlap` compares the images given to ``evaluate``, ``calibrate``, ``adapt`` and ``probe``
with that record and says how many are training images, validation images and near-duplicates of
either. A result is called *external* only when all three are zero. A checkpoint made before this
record existed loads as before; its overlap is reported as "cannot be checked".
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

THUMB = 32  # thumbnail side (the shared data README's 32 x 32 near-duplicate rule)
NEAR = 0.95  # thumbnail correlation at or above which two images are the same film
SCALE = 32.0  # int8 = round(z * SCALE): z-scores in [-3.97, 3.97]
SUBSETS = ("train", "val")


@dataclass(frozen=True)
class Fingerprints:
    """``hashes``: ``N`` int64; ``thumbs``: ``N x THUMB*THUMB`` int8 (z-scores x :data:`SCALE`)."""

    hashes: torch.Tensor
    thumbs: torch.Tensor

    def __len__(self) -> int:
        return len(self.hashes)


def pixel_hash(image: torch.Tensor) -> int:
    """First 8 bytes of the SHA-256 of a ``1 x S x S`` uint8 image's pixels, as a signed int64."""
    digest = hashlib.sha256(image.contiguous().numpy().tobytes()).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


def thumbnails(images: torch.Tensor) -> torch.Tensor:
    """``N x 1 x S x S`` uint8 -> ``N x THUMB*THUMB`` int8: area-averaged, z-normalised, x SCALE."""
    t = F.adaptive_avg_pool2d(images.float(), THUMB).flatten(1)
    t = (t - t.mean(1, keepdim=True)) / t.std(1, keepdim=True).clamp_min(1e-6)
    return (t * SCALE).round().clamp(-127, 127).to(torch.int8)


def fingerprints(images, rows: list[int] | None = None, *, batch: int = 256) -> Fingerprints:
    """Fingerprints of ``images[rows]`` (a uint8 tensor or a packed store's rows; all rows by default),
    read ``batch`` at a time so a streamed pack is never loaded whole."""
    rows = list(range(len(images))) if rows is None else list(rows)
    hashes, thumbs = [], []
    for k in range(0, len(rows), batch):
        part = rows[k : k + batch]
        x = images[torch.tensor(part, dtype=torch.long)] if isinstance(images, torch.Tensor) else images[part]
        hashes += [pixel_hash(im) for im in x]
        thumbs.append(thumbnails(x))
    thumb = torch.cat(thumbs) if thumbs else torch.zeros((0, THUMB * THUMB), dtype=torch.int8)
    return Fingerprints(torch.tensor(hashes, dtype=torch.int64), thumb)


def provenance_record(train: Fingerprints, val: Fingerprints, image_size: int) -> dict:
    """The checkpoint's record of its training (subset 0) and validation (subset 1) images."""
    return {
        "version": 1,
        "image_size": int(image_size),
        "hash": torch.cat([train.hashes, val.hashes]),
        "thumb": torch.cat([train.thumbs, val.thumbs]),
        "subset": torch.cat([torch.zeros(len(train), dtype=torch.uint8), torch.ones(len(val), dtype=torch.uint8)]),
    }


def merge_records(records: list[dict | None]) -> dict | None:
    """One record for an ensemble: every member's images (a member without a record makes the whole
    unknown: None). An image in one member's training split and another's validation split counts as training."""
    if not records or any(r is None for r in records):
        return None
    hashes = torch.cat([r["hash"] for r in records])
    thumbs = torch.cat([r["thumb"] for r in records])
    subset = torch.cat([r["subset"] for r in records])
    order = torch.argsort(subset, stable=True)  # training rows first: unique() keeps the first of each hash
    hashes, thumbs, subset = hashes[order], thumbs[order], subset[order]
    _, first = np.unique(hashes.numpy(), return_index=True)
    keep = torch.from_numpy(np.sort(first))
    return {
        "version": 1,
        "image_size": max(int(r["image_size"]) for r in records),
        "hash": hashes[keep],
        "thumb": thumbs[keep],
        "subset": subset[keep],
    }


def valid_record(rec) -> bool:
    """A provenance record with consistent shapes (a checkpoint's ``provenance`` entry)."""
    try:
        n = len(rec["hash"])
        return (
            rec["hash"].dtype == torch.int64
            and tuple(rec["thumb"].shape) == (n, THUMB * THUMB)
            and rec["thumb"].dtype == torch.int8
            and len(rec["subset"]) == n
        )
    except (KeyError, TypeError, AttributeError):
        return False


@dataclass
class Overlap:
    """How many of ``images`` evaluated images the model trained (``train``) or validated (``val``) on,
    and how many more are near-duplicates of those (``near``). ``checked`` is False for a checkpoint
    without a provenance record. ``per_image``: "train", "val", "near-train", "near-val" or "" per image."""

    images: int
    train: int = 0
    val: int = 0
    near: int = 0
    checked: bool = True
    per_image: list[str] = field(default_factory=list)
    max_correlation: list[float] = field(default_factory=list)

    @property
    def external(self) -> bool:
        """No image of the evaluated set is, or nearly is, one the model trained or validated on."""
        return self.checked and self.train + self.val + self.near == 0

    def line(self) -> str:
        if not self.checked:
            return (
                f"overlap with the training data cannot be checked: this checkpoint has no record of its training "
                f"images (made before covidscan 0.3); do not call these {self.images} images external"
            )
        s = (
            f"{self.train} of {self.images} images are in this model's training split, {self.val} in its validation "
            f"split, {self.near} near-duplicates of those (32 x 32 thumbnail correlation >= {NEAR})"
        )
        return s + (": none was seen in training" if self.external else ": NOT an external evaluation")

    def to_dict(self) -> dict:
        return {
            "images": self.images,
            "train": self.train,
            "val": self.val,
            "near_duplicates": self.near,
            "checked": self.checked,
            "external": self.external,
            "near_threshold": NEAR,
            "summary": self.line(),
        }


def overlap(record: dict | None, fp: Fingerprints, *, near: float = NEAR, chunk: int = 512) -> Overlap:
    """Compare the images behind ``fp`` with a checkpoint's provenance ``record``."""
    n = len(fp)
    if record is None:
        return Overlap(n, checked=False, per_image=[""] * n, max_correlation=[float("nan")] * n)
    ref_hash: dict[int, int] = {}
    for h, s in zip(record["hash"].tolist(), record["subset"].tolist()):
        ref_hash[h] = min(ref_hash.get(h, s), s)  # training wins when the same pixels are in both
    ref = record["thumb"].float()
    ref = ref / ref.norm(dim=1, keepdim=True).clamp_min(1e-6)
    subset = record["subset"]
    per, best = [], []
    for k in range(0, n, chunk):
        q = fp.thumbs[k : k + chunk].float()
        q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-6)
        if len(ref):
            corr = q @ ref.T
            mx, arg = corr.max(1)
        else:
            mx, arg = torch.full((len(q),), -1.0), torch.zeros(len(q), dtype=torch.long)
        for j in range(len(q)):
            h = int(fp.hashes[k + j])
            best.append(float(mx[j]))
            if h in ref_hash:
                per.append(SUBSETS[ref_hash[h]])
            elif float(mx[j]) >= near:
                per.append("near-" + SUBSETS[int(subset[arg[j]])])
            else:
                per.append("")
    return Overlap(
        n,
        train=per.count("train"),
        val=per.count("val"),
        near=sum(p.startswith("near") for p in per),
        per_image=per,
        max_correlation=best,
    )

"""Compact checkpoints: weight-only int8 per output channel for the large layers, float16 for the rest,
xz-compressed, restored to float32 at load.

Convolution and linear weights of more than :data:`INT8_MIN_NUMEL` values are stored as int8 with one
float32 scale per output channel (``max |w| / 127``): each weight moves by at most half a step, 0.4% of its
channel's largest weight. The other floating tensors (small layers, biases, BatchNorm parameters and
statistics) are stored as float16; the provenance record stays as it is. The metadata is the checkpoint's own, so a compact file expands to an
ordinary covidscan checkpoint (:func:`expand_checkpoint`) that every command reads. The model zoo
(:mod:`covidscan.zoo`) ships its models this way; the parity of each with its float32 original is in its card.

Layout (``torch.save`` of plain tensors and primitives, then xz)::

    {"format": "covidscan-compact", "version": 1, "meta": {...}, "state_int8": {...}, "provenance": {...}}
"""

from __future__ import annotations

import hashlib
import io
import lzma
from pathlib import Path

import torch

from covidscan.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from covidscan.errors import CheckpointError

FORMAT = "covidscan-compact"
VERSION = 1
SCALE = ".__int8_scale"


#: weights larger than this are stored as int8; smaller float tensors as float16. Measured on the zoo's xray
#: ensemble (200 test images): int8 everywhere moved a probability by up to 0.18 (mean 0.03) in 22 MB; the small
#: layers (stems, depthwise and 1 x 1 convolutions, heads) carry that sensitivity, and keeping every tensor of up
#: to 300,000 values in float16 gives 0.011 (mean 0.002, what float16 alone gives) in 33 MB.
INT8_MIN_NUMEL = 300_000


def quantize(state: dict, *, min_numel: int = 0) -> dict:
    """int8 per output channel for weights of two or more dimensions with more than ``min_numel`` values; with
    ``min_numel`` > 0 the other floating tensors are stored as float16; everything else unchanged."""
    out = {}
    for k, v in state.items():
        if v.is_floating_point() and v.ndim >= 2 and v.numel() > min_numel:
            w = v.float()
            scale = w.abs().amax(dim=tuple(range(1, w.ndim)), keepdim=True).clamp_min(1e-12) / 127
            out[k] = torch.round(w / scale).to(torch.int8)
            out[k + SCALE] = scale
        elif v.is_floating_point() and min_numel > 0:
            out[k] = v.half()
        else:
            out[k] = v
    return out


def dequantize(packed: dict) -> dict:
    """Inverse of :func:`quantize` (float32 weights)."""
    out = {}
    for k, v in packed.items():
        if k.endswith(SCALE):
            continue
        if k + SCALE in packed:
            out[k] = v.float() * packed[k + SCALE]
        else:
            out[k] = v.float() if v.is_floating_point() else v
    return out


def compact_checkpoint(src: str | Path, dst: str | Path, *, min_numel: int = INT8_MIN_NUMEL) -> Path:
    """Write ``src`` (a covidscan checkpoint) as a compact file ``dst``: weights with more than ``min_numel``
    values in int8, other floating tensors in float16 (the reader needs no setting: int8 tensors carry scales)."""
    obj = load_checkpoint(src)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "meta": obj["meta"].to_dict(),
        "state_int8": quantize(obj["state_dict"], min_numel=min_numel),
        "provenance": obj.get("provenance"),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(lzma.compress(buf.getvalue(), preset=9 | lzma.PRESET_EXTREME))
    return dst


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def expand_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Restore a compact file to an ordinary float32 checkpoint at ``dst`` (written atomically).

    Raises:
        CheckpointError: not a compact covidscan file (truncated, another format or version).
    """
    src = Path(src)
    try:
        obj = torch.load(io.BytesIO(lzma.decompress(src.read_bytes())), map_location="cpu", weights_only=True)
    except (lzma.LZMAError, EOFError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{src}: not a readable compact checkpoint ({type(exc).__name__}: {str(exc)[:120]})") from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or obj.get("version") != VERSION:
        raise CheckpointError(f"{src}: not a covidscan compact checkpoint of version {VERSION}")
    meta = CheckpointMeta.from_dict(obj["meta"], str(src))
    return save_checkpoint(dst, dequantize(obj["state_int8"]), meta, provenance=obj.get("provenance"))

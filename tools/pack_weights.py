"""Shrink an ImageNet state dict for the GPU machine's 64 MiB transfer limit, and restore it there.

    python tools/pack_weights.py pack   IN.pth  OUT.int8.pth.xz   # here: int8 per output channel, xz
    python tools/pack_weights.py unpack IN.int8.pth.xz OUT.pth     # there: back to a float32 state dict

Every floating tensor of two or more dimensions (convolution and linear weights) is stored as int8
with one float32 scale per output channel (``max |w| / 127``), so each weight moves by at most half a
step, 0.4% of its channel's largest weight; other tensors (batch-norm statistics, biases) are kept as
they are. Used only as a starting point for fine-tuning on the GPU machine; the result names the
restored file's hash like any other weights file.
"""

from __future__ import annotations

import argparse
import io
import lzma
from pathlib import Path

import torch

from covidscan.compact import dequantize, quantize  # one int8 scheme for shipped models and transfers


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["pack", "unpack"])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    args = ap.parse_args()
    if args.mode == "pack":
        buf = io.BytesIO()
        torch.save(quantize(torch.load(args.src, map_location="cpu", weights_only=True)), buf)
        args.dst.write_bytes(lzma.compress(buf.getvalue(), preset=9))
    else:
        state = dequantize(torch.load(io.BytesIO(lzma.decompress(args.src.read_bytes())), weights_only=True))
        torch.save(state, args.dst)
    print(f"{args.mode}: {args.src} -> {args.dst} ({args.dst.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()

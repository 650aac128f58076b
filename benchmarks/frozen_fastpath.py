"""Frozen-backbone fast path vs recomputing the frozen backbone every epoch vs full fine-tuning.

    python benchmarks/frozen_fastpath.py [--data ../shared/data/xray] [--epochs 8]

Same data, split, seed and head (EfficientNet-Lite0 with its offline ImageNet weights, 224 px,
no augmentation). (a) frozen backbone, features computed once (covidscan's fast path);
(b) frozen backbone recomputed every epoch (the plain way; same result up to rounding);
(c) full network fine-tuned, 1 epoch. Prints wall time, best validation accuracy and the time
each needed to reach (a)'s best validation accuracy.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from covidscan.config import load_config
from covidscan.training import train


def run(overrides, data, out) -> tuple[float, list[dict]]:
    cfg = load_config(
        None,
        [
            "model.backbone=efficientnet_lite0",
            "model.weights=imagenet",
            "data.image_size=224",
            "augment.enabled=false",
            "train.batch_size=32",
            "data.cache_dir=",
            *overrides,
        ],
    )
    torch.manual_seed(0)
    t = time.perf_counter()
    res = train(cfg, data, out)
    return time.perf_counter() - t, res.history


def time_to(history, wall, target) -> str:
    # wall time is spread over epochs in proportion to their measured seconds (decode/feature time counts in epoch 1)
    total = sum(h["seconds"] for h in history)
    spent = 0.0
    for h in history:
        spent += h["seconds"]
        if h["val_acc"] >= target - 1e-9:
            return f"{wall * spent / total:.0f} s (epoch {h['epoch']})"
    return "not reached"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "xray")
    ap.add_argument("--epochs", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        frozen = ["model.freeze_backbone=true", "train.lr=1e-3", f"train.epochs={args.epochs}"]
        wa, ha = run(frozen, args.data, Path(tmp) / "a")
        wb, hb = run([*frozen, "train.feature_cache=false"], args.data, Path(tmp) / "b")
        wc, hc = run(["train.lr=3e-4", "train.epochs=1"], args.data, Path(tmp) / "c")
    target = max(h["val_acc"] for h in ha)
    for name, w, h in (
        ("(a) frozen, features once (fast path)", wa, ha),
        ("(b) frozen, backbone every epoch", wb, hb),
        ("(c) full network, 1 epoch", wc, hc),
    ):
        print(
            f"{name}: {len(h)} epochs in {w:.0f} s, best val acc {max(x['val_acc'] for x in h):.3f}, "
            f"time to {target:.3f}: {time_to(h, w, target)}"
        )
    same = all(abs(x["val_loss"] - y["val_loss"]) < 1e-3 for x, y in zip(ha, hb))
    print(f"(a) and (b) give the same validation losses: {same}")
    print(f"RATIO wall (b)/(a): {wb / wa:.1f}x")


if __name__ == "__main__":
    main()

"""Predict: warm single-image latency (file -> probabilities) and batch throughput per backbone,
plus peak memory (max RSS) of predicting and of a training step, each in a fresh process.

    python benchmarks/predict_latency.py [--backbones ...] [--size 224]

The reference for latency is the bare model forward on an already preprocessed tensor
(ratio = end-to-end latency / forward): the rest is decoding and preprocessing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

IMAGE = Path(__file__).resolve().parents[2] / "shared" / "data" / "xray" / "covid" / "ieee8023_00870a9c.jpg"


def child(backbone: str, size: int, mode: str) -> dict:
    import resource

    import torch

    from covidscan.checkpoint import CheckpointMeta
    from covidscan.data import read_image
    from covidscan.data.transforms import Preprocess
    from covidscan.inference import Predictor
    from covidscan.models import build_model

    torch.manual_seed(0)
    model, _ = build_model(backbone, "linear", 3)
    pre = Preprocess.for_backbone(model.spec, size)
    meta = CheckpointMeta.from_dict(
        {"class_names": ["covid", "pneumonia", "normal"], "preprocess": pre.to_dict(), "task": "xray", "backbone": backbone,
         "head": "linear"}
    )  # fmt: skip
    out: dict = {}
    if mode == "predict":
        p = Predictor(model, meta)
        scan = read_image(IMAGE)
        for _ in range(3):
            p.predict(IMAGE)
        lat, fwd = [], []
        x = p.tensor(scan)
        for _ in range(10):
            t = time.perf_counter()
            p.predict(IMAGE)
            lat.append(time.perf_counter() - t)
            t = time.perf_counter()
            p.probabilities(x)
            fwd.append(time.perf_counter() - t)
        xb = torch.randn(16, 3, size, size)
        p.probabilities(xb)
        t = time.perf_counter()
        for _ in range(3):
            p.probabilities(xb)
        out = {
            "latency_ms": statistics.median(lat) * 1000,
            "forward_ms": statistics.median(fwd) * 1000,
            "batch16_img_s": 48 / (time.perf_counter() - t),
        }
    else:
        model.train()
        opt = torch.optim.Adam(model.parameters(), 1e-4)
        x, y = torch.randn(16, 3, size, size), torch.randint(0, 3, (16,))
        for _ in range(2):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbones", nargs="+")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--child", nargs=2)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.size, args.child[1])))
        return
    from covidscan.models import list_backbones

    names = args.backbones or list_backbones()
    print(
        f"{'backbone':<20} {'latency ms':>10} {'forward ms':>10} {'ratio':>6} {'batch16 img/s':>14} "
        f"{'predict RSS MB':>15} {'train-step RSS MB':>18}"
    )
    for name in names:
        res = {}
        for mode in ("predict", "train"):
            proc = subprocess.run(
                [sys.executable, __file__, "--child", name, mode, "--size", str(args.size)],
                capture_output=True,
                text=True,
                check=True,
            )
            res[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        p, t = res["predict"], res["train"]
        print(
            f"{name:<20} {p['latency_ms']:>10.1f} {p['forward_ms']:>10.1f} {p['latency_ms'] / p['forward_ms']:>6.2f} "
            f"{p['batch16_img_s']:>14.1f} {p['peak_rss_mb']:>15.0f} {t['peak_rss_mb']:>18.0f}"
        )


if __name__ == "__main__":
    main()

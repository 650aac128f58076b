"""Inference-side options for single-image predict on CPU, each against today's Predictor path in the same run.

    python benchmarks/inference_options.py [--backbone densenet121] [--runs 40]

Variants (one model, random weights, one 224 px image, warm; median of ``--runs``):
``no_grad`` (what ``Predictor.probabilities`` does), ``inference_mode``, ``channels_last`` (model and
input NHWC), ``fx_fuse`` (conv + BatchNorm folded by ``torch.fx.experimental.optimization.fuse``),
``threads=1`` (``torch.set_num_threads(1)``), and ONNX Runtime (the exported graph, all cores).
Each row gives the median, its ratio to ``no_grad`` and the largest probability difference from it:
an option is worth keeping only if it is faster with the same outputs (< 1e-5).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def timed(fn, runs: int) -> tuple[float, torch.Tensor]:
    for _ in range(3):
        out = fn()
    t = []
    for _ in range(runs):
        s = time.perf_counter()
        out = fn()
        t.append(time.perf_counter() - s)
    return statistics.median(t) * 1000, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="densenet121")
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--size", type=int, default=224)
    a = ap.parse_args()
    from covidscan.models import build_model

    torch.manual_seed(0)
    model, _ = build_model(a.backbone, "linear", 3, weights="none")
    model.eval()
    x = torch.randn(1, 3, a.size, a.size)
    rows = []

    def run(name, fn):
        ms, out = timed(fn, a.runs)
        rows.append((name, ms, out.float().softmax(1)))

    def no_grad():
        with torch.no_grad():
            return model(x)

    def inference_mode():
        with torch.inference_mode():
            return model(x)

    run("no_grad (Predictor today)", no_grad)
    run("inference_mode", inference_mode)
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    xcl = x.contiguous(memory_format=torch.channels_last)
    run("channels_last", lambda: torch.inference_mode()(cl)(xcl))
    try:
        from torch.fx.experimental.optimization import fuse

        fused = fuse(copy.deepcopy(model))
        run("fx_fuse (conv+BN folded)", lambda: torch.inference_mode()(fused)(x))
    except Exception as exc:  # models fx cannot trace
        print(f"fx_fuse: not traceable ({type(exc).__name__}: {str(exc)[:80]})")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run("threads=1", inference_mode)
    torch.set_num_threads(threads)
    try:
        import onnxruntime as ort

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.onnx"
            torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"], dynamo=False)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = os.cpu_count() or 1
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            xn = x.numpy()
            run("onnxruntime", lambda: torch.from_numpy(sess.run(None, {"x": xn})[0]))
    except ImportError:
        print("onnxruntime not installed (pip install onnxruntime): skipped")
    base_ms, base_p = rows[0][1], rows[0][2]
    print(f"{a.backbone}, batch 1, {a.size} px, {torch.get_num_threads()} threads, median of {a.runs} warm runs\n")
    print("| variant | median ms | vs no_grad | max abs probability difference |")
    print("|---|---:|---:|---:|")
    for name, ms, p in rows:
        print(f"| {name} | {ms:.1f} | {base_ms / ms:.2f}x | {(p - base_p).abs().max().item():.1e} |")


if __name__ == "__main__":
    main()

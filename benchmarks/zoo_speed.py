"""Speed of a zoo model (default ``xray``, the EfficientNet-Lite0 + InceptionV3 ensemble) on this machine.

    python benchmarks/zoo_speed.py [--model xray] [--image IMG] [--repeats 30] [--serve-seconds 20]

1. ``Predictor.predict(path)`` (file -> probabilities, warnings and out-of-distribution checks included), warm,
   median of ``--repeats``: the torch backend and ``--backend onnxruntime``;
2. the reference, written as a competent user would: PIL -> grayscale -> resize -> tensor, each member's plain
   forward in PyTorch (eval mode, ``torch.inference_mode``), the softmax averaged; ratio = covidscan / reference;
3. the service: requests/s and latency with 4 concurrent clients for ``--serve-seconds``, for the ensemble and for
   its first member alone (the single model the README main job trains).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import threading
import time
from pathlib import Path

IMAGE = Path(__file__).resolve().parents[2] / "shared" / "data" / "xray" / "covid" / "ieee8023_00870a9c.jpg"


def timed(fn, repeats: int) -> float:
    fn()
    fn()  # warm: first calls allocate
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def reference(checkpoint: Path, image: Path):
    """A plain user's ensemble prediction: their own preprocessing and each member's forward."""
    import numpy as np
    import torch
    from PIL import Image

    from covidscan.checkpoint import load_checkpoint, model_from_checkpoint

    model, meta = model_from_checkpoint(load_checkpoint(checkpoint))
    members = list(model.members) if meta.members else [model]
    sizes = (
        [m.get("image_size", meta.preprocess.image_size) for m in meta.members] if meta.members else [meta.preprocess.image_size]
    )
    mean, std = torch.tensor(meta.preprocess.mean).view(3, 1, 1), torch.tensor(meta.preprocess.std).view(3, 1, 1)

    def run():
        g = Image.open(image).convert("L")
        probs = []
        with torch.inference_mode():
            for m, s in zip(members, sizes):
                x = torch.from_numpy(np.asarray(g.resize((s, s), Image.BILINEAR), np.float32) / 255)[None].expand(3, -1, -1)
                probs.append(m(((x - mean) / std)[None]).softmax(1))
        return torch.stack(probs).mean(0)

    return run


def serve_rate(checkpoint: Path, image: bytes, seconds: float, clients: int = 4) -> tuple[float, float]:
    import httpx

    from covidscan.inference import Predictor
    from covidscan.serve import create_app
    from covidscan.serve.background import serve_in_background

    app = create_app(Predictor.from_checkpoint(checkpoint, device="cpu"), max_pending=clients)
    lat, lock = [], threading.Lock()
    with serve_in_background(app) as base:
        stop = time.perf_counter() + seconds

        def client():
            with httpx.Client(timeout=120) as c:
                while time.perf_counter() < stop:
                    t = time.perf_counter()
                    if c.post(base + "/predict", files={"file": ("scan.jpg", image)}).status_code == 200:
                        with lock:
                            lat.append(time.perf_counter() - t)

        threads = [threading.Thread(target=client) for _ in range(clients)]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t0
    return len(lat) / wall, statistics.median(lat) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="xray")
    ap.add_argument("--image", type=Path, default=IMAGE)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--serve-seconds", type=float, default=20.0)
    args = ap.parse_args()

    import torch

    from covidscan.checkpoint import load_checkpoint, save_checkpoint
    from covidscan.inference import Predictor
    from covidscan.zoo import checkpoint_path

    ckpt = checkpoint_path(args.model)
    print(f"model {args.model}: {ckpt} (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    pt = Predictor.from_checkpoint(ckpt, device="cpu")
    torch_ms = timed(lambda: pt.predict(args.image), args.repeats)
    ort = Predictor.from_checkpoint(ckpt, device="cpu", backend="onnxruntime")
    ort_ms = timed(lambda: ort.predict(args.image), args.repeats)
    ref_ms = timed(reference(ckpt, args.image), args.repeats)
    print(f"predict one file: torch {torch_ms:.1f} ms, onnxruntime {ort_ms:.1f} ms; plain reference {ref_ms:.1f} ms "
          f"(ratio torch {torch_ms / ref_ms:.2f}, onnxruntime {ort_ms / ref_ms:.2f})")  # fmt: skip
    obj = load_checkpoint(ckpt)
    if obj["meta"].members:  # the first member alone, for the service comparison
        first = {k.split(".", 2)[2]: v for k, v in obj["state_dict"].items() if k.startswith("members.0.")}
        m0 = obj["meta"].members[0]
        pre0 = dataclasses.replace(obj["meta"].preprocess, image_size=m0["image_size"])
        meta0 = obj["meta"].replace(members=None, backbone=m0["backbone"], head=m0["head"], preprocess=pre0)
        single = ckpt.parent / f"{ckpt.stem}-member0.pt"
        save_checkpoint(single, first, meta0, provenance=obj.get("provenance"))
        rows = [("ensemble", ckpt), (f"its first member ({m0['backbone']})", single)]
    else:
        rows = [("model", ckpt)]
    data = args.image.read_bytes()
    for name, path in rows:
        rate, p50 = serve_rate(path, data, args.serve_seconds)
        print(f"service, 4 clients, {args.serve_seconds:.0f} s: {name} {rate:.1f} req/s, median latency {p50:.0f} ms")


if __name__ == "__main__":
    main()

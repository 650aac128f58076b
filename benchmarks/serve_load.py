"""Load check of `covidscan serve`: N concurrent uploads to a local server (127.0.0.1 only).

    python benchmarks/serve_load.py --checkpoint runs/quickstart/best.pt --image IMG [--requests 64 --concurrency 8]

Starts the app in-process on a free loopback port, measures warm single-request latency
(sequential) and then sends ``--requests`` uploads from ``--concurrency`` threads, bounded
by ``--max-seconds``. Prints p50 / p95 latency, throughput and error count, plus the
direct ``Predictor.predict_bytes`` latency as the in-process reference (ratio = HTTP
overhead).
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--image", type=Path, required=True)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-seconds", type=float, default=120.0)
    ap.add_argument("--heatmap", action="store_true")
    args = ap.parse_args()

    import httpx

    from covidscan.inference import Predictor
    from covidscan.serve import create_app
    from covidscan.serve.background import serve_in_background

    predictor = Predictor.from_checkpoint(args.checkpoint, device="cpu")
    data = args.image.read_bytes()
    with serve_in_background(create_app(predictor)) as base:
        run(args, predictor, data, base + "/predict" + ("?heatmap=true" if args.heatmap else ""), httpx)


def run(args, predictor, data: bytes, url: str, httpx) -> None:

    for _ in range(3):
        predictor.predict_bytes(data)  # warm-up
    direct = []
    for _ in range(10):
        t = time.perf_counter()
        predictor.predict_bytes(data)
        direct.append(time.perf_counter() - t)

    with httpx.Client(timeout=60) as client:
        client.post(url, files={"file": ("scan", data)})  # warm-up
        single = []
        for _ in range(10):
            t = time.perf_counter()
            client.post(url, files={"file": ("scan", data)}).raise_for_status()
            single.append(time.perf_counter() - t)

        deadline = time.perf_counter() + args.max_seconds
        lat, errors = [], 0

        def one(_):
            if time.perf_counter() > deadline:
                return None
            t = time.perf_counter()
            r = client.post(url, files={"file": ("scan", data)})
            return time.perf_counter() - t, r.status_code

        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            for res in pool.map(one, range(args.requests)):
                if res is None:
                    continue
                lat.append(res[0])
                errors += res[1] != 200
        wall = time.perf_counter() - t0
    q = statistics.quantiles(lat, n=20)
    print(f"backbone {predictor.meta.backbone}, input {predictor.pre.image_size}px, heatmap={args.heatmap}")
    print(f"direct Predictor.predict_bytes: median {statistics.median(direct) * 1000:.1f} ms")
    print(
        f"HTTP single request (sequential): median {statistics.median(single) * 1000:.1f} ms "
        f"(ratio to direct {statistics.median(single) / statistics.median(direct):.2f})"
    )
    print(
        f"load: {len(lat)} requests, concurrency {args.concurrency}: p50 {statistics.median(lat) * 1000:.1f} ms, "
        f"p95 {q[18] * 1000:.1f} ms, throughput {len(lat) / wall:.2f} req/s, errors {errors}"
    )


if __name__ == "__main__":
    main()

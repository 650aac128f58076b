"""Soak test of `covidscan serve`: N clients for a set time, with and without heat maps (127.0.0.1 only).

    python benchmarks/serve_soak.py --checkpoint C --image IMG [--clients 4] [--seconds 120] [--heatmap]

Starts the app in-process on a free loopback port (uvicorn in a thread, as `covidscan serve` runs it),
then ``--clients`` threads post the image back to back for ``--seconds``. Every 2 s the process's
resident memory (VmRSS) is sampled. Prints RSS at the start, after the first quarter (warm) and at the end,
the growth over the last half in MB per minute (a leak shows as a steady positive slope, a plateau as ~0),
latency percentiles, throughput, errors and 503s.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--image", type=Path, required=True)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--heatmap", action="store_true")
    ap.add_argument("--max-pending", type=int, default=8)
    args = ap.parse_args()

    from covidscan.inference import Predictor
    from covidscan.serve import create_app
    from covidscan.serve.background import serve_in_background

    predictor = Predictor.from_checkpoint(args.checkpoint, device="cpu")
    with serve_in_background(create_app(predictor, max_pending=args.max_pending)) as base:
        soak(args, args.image.read_bytes(), base + "/predict" + ("?heatmap=true&force_heatmap=true" if args.heatmap else ""))


def soak(args, data: bytes, url: str) -> None:
    import httpx

    lat, codes, lock = [], {}, threading.Lock()
    stop = time.perf_counter() + args.seconds
    samples = [(0.0, rss_mb())]
    t0 = time.perf_counter()

    def client() -> None:
        with httpx.Client(timeout=120) as c:
            while time.perf_counter() < stop:
                t = time.perf_counter()
                try:
                    code = c.post(url, files={"file": ("scan", data)}).status_code
                except httpx.HTTPError:
                    code = -1
                with lock:
                    codes[code] = codes.get(code, 0) + 1
                    if code == 200:
                        lat.append(time.perf_counter() - t)

    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for th in threads:
        th.start()
    while any(th.is_alive() for th in threads):
        time.sleep(2)
        samples.append((time.perf_counter() - t0, rss_mb()))
    wall = time.perf_counter() - t0
    half = [s for s in samples if s[0] >= wall / 2]
    slope = 0.0
    if len(half) >= 3:
        xs, ys = [s[0] for s in half], [s[1] for s in half]
        mx, my = statistics.mean(xs), statistics.mean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs) * 60
    warm = next(s[1] for s in samples if s[0] >= wall / 4)
    q = statistics.quantiles(lat, n=20) if len(lat) >= 20 else [float("nan")] * 19
    print(
        f"{'heat maps' if args.heatmap else 'no heat maps'}, {args.clients} clients, {wall:.0f} s: {len(lat)} ok "
        f"({len(lat) / wall:.2f} req/s), codes {dict(sorted(codes.items()))}; latency p50 {q[9] * 1000:.0f} ms, "
        f"p95 {q[18] * 1000:.0f} ms; RSS start {samples[0][1]:.0f} MB, warm {warm:.0f} MB, end {samples[-1][1]:.0f} MB, "
        f"max {max(s[1] for s in samples):.0f} MB; growth over the last half {slope:+.1f} MB/min"
    )


if __name__ == "__main__":
    main()

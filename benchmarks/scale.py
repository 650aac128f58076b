"""Scale: datasets of 10k, 30k and 100k films, in memory (``ImageStore``) vs packed and streamed.

    python benchmarks/scale.py                      # 10k, 30k, 100k (about 15 min on 2 cores, ~12 GB disk)
    python benchmarks/scale.py --sizes 2000 5000    # a quick look
    python benchmarks/scale.py --work /big/disk/scale --train-steps 50

1. Synthetic chest-film-like images, fast to make: each is a random crop (60-100% of the side),
   flip and gamma / contrast change of one of the shared X-ray films (``../shared/data/xray``,
   ``xray-extra``), 384 px, written as JPEG q85 with a manifest (label of the base film, group
   of 2 images). One pool of files; the smaller sets are its first N rows.
2. For each size, every figure in its own fresh process (so peak RSS is that phase's own):
   ``pack`` (``covidscan.data.packed.pack``, 224 px): images/s; the in-memory store: decode
   images/s and peak RSS of building it plus one data-loading epoch over it; the packed stream:
   peak RSS and images/s of one data-loading epoch with the shards evicted from the page cache
   first (``posix_fadvise DONTNEED``: a cold read, as at the start of a real run) and again warm.
   A data-loading epoch: ``DataLoader(ScanDataset, batch 32, shuffled)`` over every image, no
   model, the same code ``covidscan train`` runs; and over 3,000 images with the paper's
   augmentation, as training loads them.
3. One short training run on the largest pack: EfficientNet-Lite0, frozen backbone, augmentation
   on (so no feature cache), ``--train-steps`` steps of batch 32, 1% validation: images/s and
   peak RSS, to compare with the streams' images/s.

Prints one Markdown table (and JSON with ``--json``). Outputs go under ``--work`` (default
``runs/scale``), never beside ``../shared``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SIDE = 384
AUG_IMAGES = 3000  # the epoch with augmentation (as training loads) runs over this many images


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- 1. synthetic films ---------------------------------------------------------------------


def _make_chunk(args) -> list[dict]:
    import numpy as np
    from PIL import Image

    bases, start, stop, out = args
    films = [(np.asarray(Image.open(p).convert("L")), label) for p, label in bases]
    rows = []
    for i in range(start, stop):
        rng = np.random.default_rng(i)
        img, label = films[i % len(films)]
        h, w = img.shape
        f = rng.uniform(0.6, 1.0)
        ch, cw = int(h * f), int(w * f)
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = img[y : y + ch, x : x + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        g, c = rng.uniform(0.7, 1.4), rng.uniform(0.8, 1.2)
        lut = np.clip(((np.arange(256) / 255.0) ** g - 0.5) * c + 0.5, 0, 1)  # gamma and contrast as a lookup
        rel = f"{label}/{i // 1000:03d}/syn_{i:06d}.jpg"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        img8 = Image.fromarray(np.ascontiguousarray((lut[crop] * 255).astype(np.uint8)))
        img8.resize((SIDE, SIDE), Image.BILINEAR).save(out / rel, quality=85)
        rows.append({"file": rel, "label": label, "group_id": f"g{i // 2:06d}", "source": f"synthetic-{label}"})
    return rows


def make_pool(out: Path, n: int) -> Path:
    """``out/manifest_full.csv`` listing ``n`` synthetic films (made once, reused)."""
    from concurrent.futures import ProcessPoolExecutor

    done = out / f"manifest_{n}.csv"
    if done.is_file():
        return done
    bases = []
    for ds in ("xray", "xray-extra"):
        with open(SHARED / ds / "manifest.csv", newline="") as fh:
            bases += [(SHARED / ds / r["file"], r["label"]) for r in csv.DictReader(fh)]
    bases = bases[:: max(1, len(bases) // 300)]  # 300 base films are enough variety and load fast
    t0 = time.perf_counter()
    chunk = 2000
    jobs = [(bases, s, min(s + chunk, n), out) for s in range(0, n, chunk)]
    rows = []
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        for part in pool.map(_make_chunk, jobs):
            rows += part
    with open(done, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"made {n} synthetic films in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return done


def subset_manifest(pool: Path, n: int) -> Path:
    path = pool.parent / f"manifest_{n}.csv"
    if not path.is_file():
        lines = pool.read_text().splitlines()
        path.write_text("\n".join(lines[: n + 1]) + "\n")
    return path


# --- 2. phases, each in its own process --------------------------------------------------------


def _pre():
    from covidscan.data.transforms import Preprocess

    return Preprocess(image_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _epoch(store, n: int, workers: int, augment: bool = False) -> float:
    import torch

    from covidscan.config import AugmentConfig
    from covidscan.data.dataset import ScanDataset, scan_loader
    from covidscan.data.transforms import build_augment

    aug = build_augment(AugmentConfig(), store.pre.image_size) if augment else None  # the paper's augmentation
    ds = ScanDataset(store, list(range(n)), [0] * n, store.pre, aug)
    ds.seed = 0
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
    t0 = time.perf_counter()
    seen = 0
    for batch in scan_loader(ds, batch_size=32, sampler=order, num_workers=workers):
        seen += len(batch["image"])
    assert seen == len(ds)
    return seen / (time.perf_counter() - t0)


def phase_pack(manifest: Path, out: Path) -> dict:
    from covidscan.data.pack import pack

    r = pack(manifest, out, _pre(), overwrite=True)
    return {"pack_img_s": r.images_per_s, "pack_s": r.seconds, "pack_gib": r.bytes / 2**30, "pack_rss_mib": peak_rss_mib()}


def phase_memory(manifest: Path, workers: int) -> dict:
    from covidscan.data import load_dataset
    from covidscan.data.dataset import ImageStore

    index = load_dataset(manifest)
    t0 = time.perf_counter()
    store = ImageStore(index.records, _pre())  # no disk cache: what a first run does
    decode = len(index) / (time.perf_counter() - t0)
    rate = _epoch(store, len(index), workers)
    aug = _epoch(store, min(len(index), AUG_IMAGES), workers, augment=True)
    return {"memory_decode_img_s": decode, "memory_epoch_img_s": rate, "memory_aug_img_s": aug, "memory_rss_mib": peak_rss_mib()}


def phase_stream(packed: Path, workers: int) -> dict:
    from covidscan.data import load_dataset
    from covidscan.data.dataset import open_store

    index = load_dataset(packed)
    for shard in index.packed.shards:  # cold: out of the page cache, as at the start of a run
        fd = os.open(shard, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    store = open_store(index.records, _pre(), packed=index.packed)
    cold = _epoch(store, len(index), workers)
    warm = _epoch(store, len(index), workers)
    aug = _epoch(store, min(len(index), AUG_IMAGES), workers, augment=True)
    return {"stream_cold_img_s": cold, "stream_warm_img_s": warm, "stream_aug_img_s": aug, "stream_rss_mib": peak_rss_mib()}


def phase_train(packed: Path, out: Path, steps: int) -> dict:
    from covidscan.config import load_config
    from covidscan.training import train

    cfg = load_config(
        None,
        [
            "model.backbone=efficientnet_lite0", "model.weights=none", "model.freeze_backbone=true",
            "augment.enabled=true", "data.image_size=224", "data.val=0.01", "data.test=0.01", "train.epochs=1",
            f"train.max_batches={steps}", "train.batch_size=32", "data.cache_dir=",
        ],
    )  # fmt: skip
    r = train(cfg, packed, out, overwrite=True)
    row = r.history[-1]
    return {"train_img_s": row["train_images_per_s"], "train_rss_mib": peak_rss_mib(), "train_steps": steps}


def run_phase(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--phase", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"phase {args[0]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "scale")
    ap.add_argument(
        "--workers", type=int, default=0, help="DataLoader workers of the loading epochs (covidscan's CPU default: 0)"
    )
    ap.add_argument("--train-steps", type=int, default=40)
    ap.add_argument("--skip-memory-above", type=int, default=0, help="skip the in-memory store above this size (0: never)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--phase", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.phase:
        kind, *rest = a.phase
        fn = {"pack": phase_pack, "memory": phase_memory, "stream": phase_stream, "train": phase_train}[kind]
        conv = [Path(rest[0]), *(Path(v) if i == 0 and kind in ("pack", "train") else int(v) for i, v in enumerate(rest[1:]))]
        print(json.dumps(fn(*conv)))
        return
    a.work.mkdir(parents=True, exist_ok=True)
    films = a.work / "films"
    films.mkdir(exist_ok=True)
    pool = make_pool(films, max(a.sizes))
    rows = []
    for n in sorted(a.sizes):
        manifest = subset_manifest(pool, n)
        packed = a.work / f"packed_{n}"
        row = {"images": n}
        row.update(run_phase(["pack", str(manifest), str(packed)]))
        if not a.skip_memory_above or n <= a.skip_memory_above:
            row.update(run_phase(["memory", str(manifest), str(a.workers)]))
        row.update(run_phase(["stream", str(packed), str(a.workers)]))
        print(json.dumps(row), file=sys.stderr)
        rows.append(row)
    big = max(a.sizes)
    train_row = run_phase(["train", str(a.work / f"packed_{big}"), str(a.work / "train_run"), str(a.train_steps)])
    rows[-1].update(train_row)
    if a.json:
        print(json.dumps(rows, indent=1))
    f = lambda v, d=0: "n/a" if v is None else f"{v:,.{d}f}"  # noqa: E731
    print(f"CPU cores: {os.cpu_count()}; DataLoader workers: {a.workers}; 224 px; batch 32")
    print()
    print("| images | pack img/s | pack GiB | in-memory: decode img/s | in-memory: epoch img/s, plain / augmented "
          "| in-memory: peak RSS MiB | packed: epoch img/s cold / warm / augmented | packed: peak RSS MiB "
          "| packed / in-memory: plain cold, warm; augmented |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mem, mem_aug = r.get("memory_epoch_img_s"), r.get("memory_aug_img_s")
        ratio = (
            f"{r['stream_cold_img_s'] / mem:.2f}x, {r['stream_warm_img_s'] / mem:.2f}x; {r['stream_aug_img_s'] / mem_aug:.2f}x"
            if mem
            else "n/a"
        )
        print(
            f"| {r['images']:,} | {f(r['pack_img_s'])} | {f(r['pack_gib'], 2)} | {f(r.get('memory_decode_img_s'))} "
            f"| {f(mem)} / {f(mem_aug)} | {f(r.get('memory_rss_mib'))} "
            f"| {f(r['stream_cold_img_s'])} / {f(r['stream_warm_img_s'])} / {f(r['stream_aug_img_s'])} "
            f"| {f(r['stream_rss_mib'])} | {ratio} |"
        )
    print()
    print(
        f"Training on the packed {big:,}: EfficientNet-Lite0, frozen backbone, augmentation on, {train_row['train_steps']} steps "
        f"of 32: {train_row['train_img_s']:.1f} img/s, peak RSS {train_row['train_rss_mib']:,.0f} MiB "
        f"(the packed stream delivers {rows[-1]['stream_cold_img_s'] / train_row['train_img_s']:.0f}x that cold)"
    )


if __name__ == "__main__":
    main()

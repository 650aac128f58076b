"""Data pipeline: an epoch served from covidscan's decode-once cache vs decoding every epoch.

    python benchmarks/data_pipeline.py [--data ../shared/data/xray] [--size 224]

Reference ("decode every epoch", what a plain ImageFolder loop does): read each file,
decode, convert to gray, resize. covidscan: epoch 1 decodes once into the cache (and
writes the on-disk cache); epoch >= 2 reads the uint8 store; a later run reloads the
on-disk cache (content hash + .npy read). Both produce the same model input tensors.
Prints seconds per epoch and the ratios.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from covidscan.data import load_dataset, read_image
from covidscan.data.dataset import ImageStore, ScanDataset
from covidscan.data.transforms import Preprocess, to_gray_uint8, to_input
from covidscan.models import get_backbone


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "xray")
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    torch.set_num_threads(1)  # measure the pipeline, not BLAS threading
    index = load_dataset(args.data)
    pre = Preprocess.for_backbone(get_backbone("densenet121"), args.size)
    n = len(index)

    t = time.perf_counter()
    ref = [to_input(to_gray_uint8(read_image(r.path), args.size), pre) for r in index.records]
    t_ref = time.perf_counter() - t

    with tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        store = ImageStore(index.records, args.size, cache_dir=cache, workers=1)
        t_first = time.perf_counter() - t
        ds = ScanDataset(store, list(range(n)), index.targets(), pre)
        t = time.perf_counter()
        items = [ds[i]["image"] for i in range(len(ds))]
        t_cached = time.perf_counter() - t
        t = time.perf_counter()
        again = ImageStore(index.records, args.size, cache_dir=cache, workers=1)
        t_disk = time.perf_counter() - t
        assert again.hits == n
    same = all(torch.equal(a, b) for a, b in zip(ref, items))
    print(f"{n} images from {args.data}, {args.size} px, 1 thread")
    print(f"decode every epoch (reference): {t_ref:.2f} s/epoch ({n / t_ref:.0f} img/s)")
    print(f"covidscan epoch 1 (decode + write cache): {t_first:.2f} s")
    print(f"covidscan epoch >= 2 (in-memory store): {t_cached:.2f} s/epoch ({n / t_cached:.0f} img/s)")
    print(f"covidscan later run (on-disk cache reload): {t_disk:.2f} s")
    print(f"identical model inputs: {same}")
    print(f"RATIO epoch>=2 speed-up vs decoding every epoch: {t_ref / t_cached:.1f}x (goal >= 5x)")
    print(f"RATIO later-run load vs decoding: {t_ref / t_disk:.1f}x")


if __name__ == "__main__":
    main()

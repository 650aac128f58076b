"""Training throughput: covidscan's loop vs a plain torchvision loop, on CPU or one GPU.

    python benchmarks/train_throughput.py [--backbones densenet121 inception_v3] [--images 96] [--val 64]
    python benchmarks/train_throughput.py --device cuda --images 1024 --batch 64 --workers 8   # GPU: AMP + channels_last vs fp32

The plain loop gets the DataLoader workers a user would set (the core count) and, for comparison,
none (``--workers`` to choose); the ratio against the first is the one that counts.

Plain reference, written the obvious way: an ImageFolder-style dataset that opens each file
with PIL every time, ``transforms.Compose([Grayscale(3), Resize((224, 224)), RandomAffine,
RandomHorizontalFlip, ToTensor, Normalize])``, ``torchvision.models.<name>`` with the last
layer replaced, Adam 1e-4, fp32, default memory format. covidscan: ``covidscan.training.train``
with the same model, batch size, data and augmentation strengths (decode-once cache, plus
whatever CPU options are switched on in its config). Both train one epoch on the same
``--images`` training images and report images/s and accuracy on the same ``--val`` images.
Absolute numbers on a shared 2-core machine are noisy: read the ratio.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision import transforms as T

from covidscan.config import load_config
from covidscan.training import train

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "xray"
CLASSES = ("covid", "pneumonia", "normal")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _peak_mib(dev: torch.device) -> float:
    return torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else float("nan")


def plain_loop(
    backbone: str, rows, val_rows, batch: int, size: int, dev=None, workers: int = 0, epochs: int = 1
) -> tuple[float, float]:
    """The plain reference: PIL decode per step, fp32, default memory format, on ``dev``; images/s of the last epoch."""
    dev = torch.device(dev or "cpu")
    norm = ((0.5,) * 3, (0.5,) * 3) if backbone == "inception_v3" else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    aug = T.Compose(
        [
            T.Grayscale(3),
            T.Resize((size, size)),
            T.RandomAffine(10, (0.1, 0.1), (0.9, 1.1)),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(*norm),
        ]
    )
    plain = T.Compose([T.Grayscale(3), T.Resize((size, size)), T.ToTensor(), T.Normalize(*norm)])

    class Files(torch.utils.data.Dataset):
        def __init__(self, items, tf):
            self.items, self.tf = items, tf

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            path, label = self.items[i]
            return self.tf(Image.open(path).convert("RGB")), label

    if backbone == "inception_v3":
        model = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True)
        model.fc = nn.Linear(model.fc.in_features, 3)
    else:
        model = getattr(torchvision.models, backbone)(weights=None)
        model.classifier = nn.Linear(model.classifier.in_features, 3)
    model.to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loader = torch.utils.data.DataLoader(
        Files(rows, aug), batch_size=batch, shuffle=True, drop_last=True, num_workers=workers, pin_memory=dev.type == "cuda"
    )
    model.train()
    for _ in range(epochs):  # earlier epochs warm up (worker start, cuDNN autotuning); the last one is timed
        _sync(dev)
        seen, t = 0, time.perf_counter()
        for x, y in loader:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(y)
        _sync(dev)
    ips = seen / (time.perf_counter() - t)
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(Files(val_rows, plain), batch_size=32, num_workers=workers):
            correct += (model(x.to(dev)).argmax(1).cpu() == y).sum().item()
    return ips, correct / len(val_rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbones", nargs="+", default=["densenet121", "inception_v3"])
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--val", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=1, help="epochs per loop; images/s of the last one (the rest warm up)")
    ap.add_argument("--set", action="append", default=[], help="extra covidscan overrides (CPU options)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (both loops run there)")
    ap.add_argument(
        "--workers", type=int, nargs="+", default=None,
        help="DataLoader workers of the plain loop, one run each (default: the core count, as a user would set, and 0); "
        "the first is also covidscan's on CUDA",
    )  # fmt: skip
    ap.add_argument("--data", type=Path, default=SHARED, help="an X-ray folder with manifest.csv")
    args = ap.parse_args()
    import os

    workers = args.workers or [os.cpu_count() or 1, 0]
    data = args.data.resolve()  # split.csv in a temporary folder names files by absolute path
    dev = torch.device(args.device)
    rows = list(csv.DictReader(open(data / "manifest.csv")))
    if args.images + args.val > len(rows):
        raise SystemExit(f"--images {args.images} + --val {args.val} > the {len(rows)} images in {data}")
    import random

    random.Random(0).shuffle(rows)  # the manifest is sorted by class: shuffle (seeded) so both subsets hold every class
    train_rows, val_rows = rows[: args.images], rows[args.images : args.images + args.val]
    items = [(data / r["file"], CLASSES.index(r["label"])) for r in train_rows]
    val_items = [(data / r["file"], CLASSES.index(r["label"])) for r in val_rows]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        split = Path(tmp) / "split.csv"
        with open(split, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["file", "label", "split"])
            w.writeheader()
            for r, s in [(r, "train") for r in train_rows] + [(r, "val") for r in val_rows]:
                w.writerow({"file": str(data / r["file"]), "label": r["label"], "split": s})
        for backbone in args.backbones:
            torch.manual_seed(0)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            plain = {}
            for w in workers:
                torch.manual_seed(0)
                plain[w] = plain_loop(backbone, items, val_items, args.batch, args.size, dev, w, args.epochs)
            p_ips, p_acc = plain[workers[0]]
            p_mem = _peak_mib(dev)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
            cfg = load_config(
                None,
                [
                    f"model.backbone={backbone}",
                    "model.weights=none",
                    f"data.image_size={args.size}",
                    f"train.epochs={args.epochs}",
                    f"train.batch_size={args.batch}",
                    "data.cache_dir=",
                    f"train.device={args.device}",
                    f"data.num_workers={workers[0] if dev.type == 'cuda' else 0}",
                    *args.set,
                ],
            )
            torch.manual_seed(0)
            t = time.perf_counter()
            res = train(cfg, None, Path(tmp) / backbone, split_file=split)
            wall = time.perf_counter() - t
            c_ips = res.history[-1]["train_images_per_s"]
            c_acc = res.history[-1]["val_acc"]
            c_mem = _peak_mib(dev)
            results[backbone] = {
                "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                "plain_peak_gpu_mib": p_mem,
                "covidscan_peak_gpu_mib": c_mem,
                "plain_img_s": p_ips,
                "plain_workers": workers[0],
                "plain_img_s_by_workers": {w: v[0] for w, v in plain.items()},
                "covidscan_img_s": c_ips,
                "ratio": c_ips / p_ips,
                "ratio_by_plain_workers": {w: c_ips / v[0] for w, v in plain.items()},
                "plain_val_acc": p_acc,
                "covidscan_val_acc": c_acc,
                "covidscan_wall_s_incl_decode": wall,
            }
            others = "".join(
                f" | vs plain with {w} workers ({v[0]:.2f} img/s): {c_ips / v[0]:.2f}x"
                for w, v in plain.items()
                if w != workers[0]
            )
            print(
                f"{backbone}: plain with {workers[0]} workers {p_ips:.2f} img/s (val acc {p_acc:.3f}) | covidscan {c_ips:.2f} img/s "
                f"(val acc {c_acc:.3f}) | RATIO {c_ips / p_ips:.2f}x (goal >= 1.3x CPU, 1.5x GPU){others}"
                + (f" | peak GPU memory plain {p_mem:.0f} MiB, covidscan {c_mem:.0f} MiB" if dev.type == "cuda" else "")
            )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

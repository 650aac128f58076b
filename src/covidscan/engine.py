"""The one training / evaluation loop, for every backbone, head and task.

``train(cfg, data, out)`` loads the data, makes (or reads) a leak-free split, builds the
model, trains with Adam, selects the best epoch on *validation* only, and writes into
``out``: ``config.yaml`` (resolved), ``split.csv``, ``history.jsonl`` (one line per
epoch), ``best.pt`` and ``last.pt``. ``resume=True`` continues from ``last.pt`` and ends
with the same weights as an uninterrupted run (same seed, CPU): every epoch's shuffling,
augmentation and dropout draw from a generator seeded by ``(seed, epoch)``.

Under ``torchrun --nproc_per_node=N`` it trains with DistributedDataParallel: a
distributed sampler, gradients averaged across processes, and logging, validation and
checkpoints on rank 0.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, RandomSampler, WeightedRandomSampler

from covidscan.checkpoint import library_versions, load_checkpoint, save_checkpoint
from covidscan.config import Config, config_from_dict, save_config
from covidscan.data import Split, grouped_split, load_dataset, paper_split, read_split, write_split
from covidscan.data.dataset import ImageStore, ScanDataset, balanced_weights, default_cache_dir
from covidscan.data.transforms import Preprocess, build_augment, model_input
from covidscan.models import build_model

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    out: Path
    best_checkpoint: Path
    last_checkpoint: Path
    best_epoch: int
    best_metrics: dict
    weights_source: str
    seconds: float
    history: list[dict] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but CUDA is not available; use cpu or auto")
    return torch.device(name)


def make_split(cfg: Config, data, split_file: Path | None = None) -> Split:
    """Read ``split_file``, or split ``data`` by ``cfg.data.protocol`` (grouped by default)."""
    if split_file is not None:
        split = read_split(split_file, cfg.data.task)
    else:
        index = load_dataset(data, cfg.data.task)
        fn = paper_split if cfg.data.protocol == "paper" else grouped_split
        split = fn(index, test=cfg.data.test, val=cfg.data.val, seed=cfg.data.split_seed)
    for name in ("train", "val"):
        if not split.indices(name):
            raise ValueError(f"the split has no {name} images; need more data or other fractions")
    return split


def autocast_for(device: torch.device, cfg: Config):
    if device.type == "cuda" and cfg.train.amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and cfg.train.cpu_bf16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def _num_workers(cfg: Config, device: torch.device) -> int:
    if cfg.data.num_workers >= 0:
        return cfg.data.num_workers
    return min(8, os.cpu_count() or 1) if device.type == "cuda" else 0


def _cache_dir(cfg: Config) -> Path | None:
    if not cfg.data.cache:
        return None
    if cfg.data.cache_dir == "auto":
        return default_cache_dir() / "images"
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else None


@torch.no_grad()
def predict_loader(
    model, loader, device, ctx=nullcontext, pre: Preprocess | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Whole-split softmax probabilities ``N x C``, labels, dataset indices and mean loss."""
    model.eval()
    probs, labels, idx, loss_sum = [], [], [], 0.0
    for batch in loader:
        x = model_input(batch["image"], pre, device)
        y = batch["label"].to(device)
        with ctx():
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        probs.append(logits.softmax(1).cpu())
        labels.append(y.cpu())
        idx.append(batch["index"])
    p, y = torch.cat(probs).numpy(), torch.cat(labels).numpy()
    return p, y, torch.cat(idx).numpy(), loss_sum / max(len(y), 1)


def _dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def train(
    cfg: Config,
    data=None,
    out: str | Path = "runs/run",
    *,
    split_file: str | Path | None = None,
    resume: bool = False,
    progress: bool = False,
    stop_after_epoch: int | None = None,
) -> TrainResult:
    """Train ``cfg`` on ``data`` (folders / manifests) into ``out``; see the module docstring.

    ``stop_after_epoch`` ends the run early as if interrupted (for tests of ``resume``).
    """
    out = Path(out)
    t_start = time.perf_counter()
    world, rank, local_rank = _dist_info()
    distributed = world > 1
    state = None
    if resume:
        last = out / "last.pt"
        obj = load_checkpoint(last)
        if "train_state" not in obj:
            raise ValueError(f"{last}: holds no training state to resume from")
        cfg = config_from_dict(obj["meta"]["config"], str(last))
        split_file = out / "split.csv"
        state = obj
    device = resolve_device(cfg.train.device)
    if distributed:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
    is_main = rank == 0

    split = make_split(cfg, data, Path(split_file) if split_file else None)
    index = split.index
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        if not resume:
            write_split(split, out / "split.csv")
        logger.info("split (%s):\n%s", split.protocol, split.format_counts())

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.train.seed)
        model, weights_source = build_model(
            cfg.model.backbone,
            cfg.model.head,
            len(index.class_names),
            weights=cfg.model.weights,
            download=cfg.model.download,
            dropout=None if cfg.model.dropout < 0 else cfg.model.dropout,
        )
        return _fit(
            cfg, model, weights_source, split, out, device, state, progress, stop_after_epoch, distributed, rank, is_main, t_start
        )


def _fit(
    cfg, model, weights_source, split, out, device, state, progress, stop_after_epoch, distributed, rank, is_main, t_start
) -> TrainResult:
    index = split.index
    pre = Preprocess.for_backbone(
        model.spec, cfg.data.image_size, equalize=cfg.data.equalize, crop=cfg.data.crop, lung_crop=cfg.data.lung_crop
    )
    targets = index.targets()
    tr_idx, va_idx = split.indices("train"), split.indices("val")
    need = sorted(set(tr_idx) | set(va_idx))
    store = ImageStore([index.records[i] for i in need], pre, cache_dir=_cache_dir(cfg), progress=progress and is_main)
    pos = {i: k for k, i in enumerate(need)}  # dataset index -> store row
    store_targets = [targets[i] for i in need]
    train_ds = ScanDataset(store, [pos[i] for i in tr_idx], store_targets, pre, build_augment(cfg.augment, pre.image_size))
    val_ds = ScanDataset(store, [pos[i] for i in va_idx], store_targets, pre)
    workers = _num_workers(cfg, device)
    loader_kw = dict(num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=False)

    if cfg.model.freeze_backbone:
        model.backbone.requires_grad_(False)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
    model.to(device)
    if cfg.train.channels_last:  # NHWC: measured +24% InceptionV3 training on CPU, neutral for DenseNet
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    class_w = None
    if cfg.train.class_weights:
        counts = np.bincount(train_ds.labels(), minlength=len(index.class_names)).astype(np.float64)
        class_w = torch.tensor(counts.sum() / np.maximum(counts, 1) / len(counts), dtype=torch.float32, device=device)

    net = model
    fast = cfg.model.freeze_backbone and cfg.train.feature_cache and not cfg.augment.enabled and not distributed
    if cfg.model.freeze_backbone and cfg.train.feature_cache and cfg.augment.enabled:
        logger.info("feature cache off: augmentation changes the backbone's input every epoch")
    if fast:
        # Frozen backbone (eval mode, no gradients) and fixed inputs: its output is the same every
        # epoch, so compute it once and train the head on it. Same batches, same dropout draws:
        # equivalent to the full loop up to float rounding.
        train_ds = FeatureDataset(_features(model, train_ds, device, cfg), train_ds)
        val_ds = FeatureDataset(_features(model, val_ds, device, cfg), val_ds)
        net = model.head
        loader_kw["num_workers"] = 0
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    history: list[dict] = []
    start_epoch, best_value, best_epoch, bad_epochs, best_metrics = 1, None, 0, 0, {}
    if state is not None:
        model.load_state_dict(state["state_dict"])
        ts = state["train_state"]
        optimizer.load_state_dict(ts["optimizer"])
        start_epoch = ts["epoch"] + 1
        best_value, best_epoch, bad_epochs = ts["best_value"], ts["best_epoch"], ts["bad_epochs"]
        best_metrics = ts["best_metrics"]
        history = list(ts["history"])
        logger.info("resuming %s at epoch %d", out, start_epoch)

    reference = appearance_reference(store.images[[pos[i] for i in tr_idx if store.valid[pos[i]]]])
    meta_base = {
        "reference": reference,
        "task": index.task,
        "class_names": list(index.class_names),
        "backbone": cfg.model.backbone,
        "head": cfg.model.head,
        "preprocess": pre.to_dict(),
        "weights_source": weights_source,
        "config": cfg.to_dict(),
        "data_fingerprint": index.fingerprint(),
        "split_fingerprint": _split_fingerprint(split),
        "split_protocol": split.protocol,
        "grouping": index.grouping,
        "train_counts": split.counts(),
        "sources": sorted({r.source for r in index.records}),
        "class_sources": index.sources(),
        "data_origins": [str(o) for o in index.origins],
        "versions": library_versions(),
    }
    ctx = lambda: autocast_for(device, cfg)  # noqa: E731
    higher_better = cfg.train.monitor == "val_acc"
    best_path, last_path = out / "best.pt", out / "last.pt"

    for epoch in range(start_epoch, cfg.train.epochs + 1):
        t0 = time.perf_counter()
        seed = cfg.train.seed * 100_003 + epoch
        torch.manual_seed(seed)  # inside train()'s fork_rng: augmentation and dropout of this epoch
        gen = torch.Generator().manual_seed(seed)
        if distributed:
            from torch.utils.data.distributed import DistributedSampler

            sampler = DistributedSampler(train_ds, shuffle=True, seed=cfg.train.seed)
            sampler.set_epoch(epoch)
        elif cfg.train.sampler == "balanced":
            recs = [index.records[need[i]] for i in train_ds.indices]
            w = balanced_weights([r.label for r in recs], [r.source for r in recs])
            sampler = WeightedRandomSampler(w, num_samples=len(train_ds), replacement=True, generator=gen)
        else:
            sampler = RandomSampler(train_ds, generator=gen)
        loader = DataLoader(
            train_ds,
            batch_size=cfg.train.batch_size,
            sampler=sampler,
            drop_last=len(train_ds) > cfg.train.batch_size,
            generator=gen,
            **loader_kw,
        )
        net.train()
        if cfg.model.freeze_backbone:
            model.backbone.eval()  # frozen batch-norm statistics too
        seen, correct, loss_sum = 0, 0, 0.0
        bar = None
        if progress and is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(loader), desc=f"epoch {epoch}/{cfg.train.epochs}", unit="batch", leave=False)
        for b, batch in enumerate(loader):
            if cfg.train.max_batches and b >= cfg.train.max_batches:
                break
            x = model_input(batch["image"], pre, device)
            if cfg.train.channels_last and not fast:
                x = x.contiguous(memory_format=torch.channels_last)
            y = batch["label"].to(device, non_blocking=True)
            with ctx():
                logits = net(x)
            loss = F.cross_entropy(logits.float(), y, weight=class_w)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            n = y.numel()
            seen += n
            loss_sum += loss.item() * n
            correct += (logits.argmax(1) == y).sum().item()
            if bar:
                bar.update()
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
        if bar:
            bar.close()
        train_secs = time.perf_counter() - t0

        stop = torch.zeros(1)
        if is_main:
            val_loader = DataLoader(val_ds, batch_size=max(cfg.train.batch_size, 32), shuffle=False, **loader_kw)
            probs, ys, _, val_loss = predict_loader(net if fast else model, val_loader, device, ctx, pre)
            val_acc = float((probs.argmax(1) == ys).mean()) if len(ys) else 0.0
            row = {
                "epoch": epoch,
                "train_loss": loss_sum / max(seen, 1),
                "train_acc": correct / max(seen, 1),
                "val_loss": val_loss,
                "val_acc": val_acc,
                "train_images_per_s": seen / max(train_secs, 1e-9),
                "seconds": time.perf_counter() - t0,
            }
            history.append(row)
            with open(out / "history.jsonl", "a" if epoch > 1 else "w", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
            logger.info(
                "epoch %d/%d  train loss %.4f acc %.3f  val loss %.4f acc %.3f  (%.0fs)",
                epoch,
                cfg.train.epochs,
                row["train_loss"],
                row["train_acc"],
                val_loss,
                val_acc,
                row["seconds"],
            )
            value = val_acc if higher_better else val_loss
            improved = best_value is None or (value > best_value if higher_better else value < best_value)
            if improved:
                best_value, best_epoch, bad_epochs = value, epoch, 0
                best_metrics = {"val_loss": val_loss, "val_acc": val_acc, "epoch": epoch}
                save_checkpoint(best_path, _cpu_state(model), {**meta_base, "epoch": epoch, "val_metrics": best_metrics})
            else:
                bad_epochs += 1
            train_state = {
                "optimizer": optimizer.state_dict(),
                "epoch": epoch,
                "best_value": best_value,
                "best_epoch": best_epoch,
                "bad_epochs": bad_epochs,
                "best_metrics": best_metrics,
                "history": history,
            }
            save_checkpoint(last_path, _cpu_state(model), {**meta_base, "epoch": epoch, "val_metrics": row}, train_state)
            if cfg.train.early_stopping and bad_epochs >= cfg.train.early_stopping:
                logger.info("early stopping: no %s improvement for %d epochs", cfg.train.monitor, bad_epochs)
                stop[0] = 1
        if distributed:
            import torch.distributed as dist

            dist.broadcast(stop, src=0)
        if stop.item() or (stop_after_epoch is not None and epoch >= stop_after_epoch):
            break
    return TrainResult(
        out=out,
        best_checkpoint=best_path,
        last_checkpoint=last_path,
        best_epoch=best_epoch,
        best_metrics=best_metrics,
        weights_source=weights_source,
        seconds=time.perf_counter() - t_start,
        history=history,
    )


THUMB = 16  # side of the appearance thumbnails used to flag inputs unlike the training scans


def thumbnails(images: torch.Tensor) -> torch.Tensor:
    """``N x 1 x S x S`` uint8 -> ``N x THUMB*THUMB`` float, each row centred and scaled to unit norm."""
    t = F.adaptive_avg_pool2d(images.float(), THUMB).flatten(1)
    t = t - t.mean(1, keepdim=True)
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-6)


def appearance_reference(images: torch.Tensor) -> dict:
    """Mean training thumbnail and the 1st percentile of training images' correlation with it.

    At prediction time an input whose correlation falls below that percentile (e.g. a CT
    slice given to an X-ray model) gets a warning; see ``covidscan.inference``.
    """
    if len(images) == 0:
        return {}
    th = thumbnails(images)
    mean = th.mean(0)
    mean = mean / mean.norm().clamp_min(1e-6)
    corr = th @ mean
    return {"thumb": mean.tolist(), "corr_p01": float(torch.quantile(corr, 0.01)), "side": THUMB}


class FeatureDataset(torch.utils.data.Dataset):
    """Backbone outputs (``N x C x h x w``) standing in for the images of ``base`` (same order, labels)."""

    def __init__(self, features: torch.Tensor, base: ScanDataset):
        self.features = features
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    @property
    def indices(self) -> list[int]:
        return self.base.indices

    def labels(self) -> list[int]:
        return self.base.labels()

    def __getitem__(self, k: int) -> dict:
        i = self.base.indices[k]
        return {"image": self.features[k], "label": self.base.targets[i], "index": i}


@torch.no_grad()
def _features(model, ds: ScanDataset, device, cfg) -> torch.Tensor:
    model.backbone.eval()
    loader = DataLoader(ds, batch_size=max(cfg.train.batch_size, 32), shuffle=False)
    out = []
    for batch in loader:
        with autocast_for(device, cfg):
            out.append(model.backbone(model_input(batch["image"], ds.pre, device)).float())
    return torch.cat(out) if out else torch.zeros(0)


def _cpu_state(model) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _split_fingerprint(split: Split) -> str:
    import hashlib

    h = hashlib.sha256()
    for rec, s in sorted(zip(split.index.records, split.assignment), key=lambda t: str(t[0].path)):
        h.update(f"{rec.path.name},{s}\n".encode())
    return h.hexdigest()


def replace_cfg(cfg: Config, **sections) -> Config:
    """``replace_cfg(cfg, train={"epochs": 1})``: a copy with some fields of some sections changed."""
    return replace(cfg, **{k: replace(getattr(cfg, k), **v) for k, v in sections.items()})

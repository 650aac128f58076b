"""Training data: the split, the decoded images, the epoch order (balanced sampler, processes), device batches."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from covidscan.config import Config
from covidscan.data import Split, exclude_sources, grouped_split, load_dataset, paper_split, read_split
from covidscan.data.dataset import (
    FeatureDataset,
    ImageStore,
    ScanDataset,
    balanced_weights,
    default_cache_dir,
    open_store,
    scan_loader,
)
from covidscan.data.transforms import Preprocess, batch_augment, build_augment, model_input
from covidscan.errors import ConfigError, DataError
from covidscan.runtime import RunContext, autocast_for

logger = logging.getLogger(__name__)


def make_split(cfg: Config, data, split_file: Path | None = None) -> Split:
    """Read ``split_file``, or split ``data`` by ``cfg.data.protocol`` (grouped by default).

    Raises:
        DataError: the split leaves train or validation empty, or a class has no training image.
    """
    if split_file is not None:
        split = read_split(split_file, cfg.data.task)
    else:
        index = exclude_sources(load_dataset(data, cfg.data.task), cfg.data.exclude)
        fn = paper_split if cfg.data.protocol == "paper" else grouped_split
        split = fn(index, test=cfg.data.test, val=cfg.data.val, seed=cfg.data.split_seed)
    for name in ("train", "val"):
        if not split.indices(name):
            raise DataError(f"the split has no {name} images; need more data or other fractions")
    counts = split.counts()["train"]
    empty = [c for c in split.index.class_names if counts[c] == 0]
    if empty and not cfg.data.allow_empty_class:
        raise DataError(
            f"no training images of class(es) {', '.join(empty)} for task {cfg.data.task!r} "
            f"(classes {', '.join(split.index.class_names)}); add them, or set data.allow_empty_class=true"
        )
    strata = cfg.train.strata
    if strata and not any(split.index.records[i].attribute(strata) for i in split.indices("train")):
        raise DataError(
            f"train.strata={strata!r}: no training image has that manifest field (a column, or {strata}=value "
            "in source_label; a packed folder keeps only source)"
        )
    return split


@dataclass
class TrainData:
    """The decoded images and the datasets one run trains and validates on."""

    pre: Preprocess
    store: ImageStore
    train: ScanDataset | FeatureDataset
    val: ScanDataset | FeatureDataset
    train_records: list  # Record of each training item, in train.indices order (for the balanced sampler)
    device_images: torch.Tensor | None = None  # train.device_data: the store's images on the device
    device_labels: torch.Tensor | None = None


def _cache_dir(cfg: Config) -> Path | None:
    if not cfg.data.cache:
        return None
    if cfg.data.cache_dir == "auto":
        return default_cache_dir() / "images"
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else None


def build_datasets(cfg: Config, split: Split, pre: Preprocess, *, progress: bool = False) -> TrainData:
    """Decode (or read from the cache) the train and validation images once; wrap them as datasets."""
    index = split.index
    targets = index.targets()
    tr_idx, va_idx = split.indices("train"), split.indices("val")
    need = sorted(set(tr_idx) | set(va_idx))
    store = open_store([index.records[i] for i in need], pre, packed=index.packed, cache_dir=_cache_dir(cfg), progress=progress)
    pos = {i: k for k, i in enumerate(need)}  # dataset index -> store row
    store_targets = [targets[i] for i in need]
    train_ds = ScanDataset(store, [pos[i] for i in tr_idx], store_targets, pre, build_augment(cfg.augment, pre.image_size))
    val_ds = ScanDataset(store, [pos[i] for i in va_idx], store_targets, pre)
    if not len(train_ds):
        raise DataError("no readable training image (every one was skipped)")
    records = [index.records[need[i]] for i in train_ds.indices]
    return TrainData(pre, store, train_ds, val_ds, records)


def uses_feature_cache(cfg: Config, run: RunContext) -> bool:
    """Frozen backbone, no augmentation, one process: the backbone's output is the same every
    epoch, so it is computed once and the head trained on it (equivalent up to float rounding)."""
    return cfg.model.freeze_backbone and cfg.train.feature_cache and not cfg.augment.enabled and not run.distributed


@torch.no_grad()
def backbone_features(model, ds: ScanDataset, device, cfg: Config) -> torch.Tensor:
    """``N x C x h x w`` backbone outputs of every item of ``ds``, in order."""
    model.backbone.eval()
    out = []
    for batch in scan_loader(ds, batch_size=max(cfg.train.batch_size, 32), shuffle=False):
        with autocast_for(device, amp=cfg.train.amp, cpu_bf16=cfg.train.cpu_bf16):
            out.append(model.backbone(model_input(batch["image"], ds.pre, device)).float())
    return torch.cat(out) if out else torch.zeros(0)


def epoch_order(cfg: Config, data: TrainData, gen: torch.Generator) -> list[int]:
    """This epoch's order of training positions, the same on every process (seeded by ``gen``):
    label x source balanced draws (``train.sampler=balanced``; label x source x ``train.strata``
    value when set) or a permutation."""
    n = len(data.train)
    if cfg.train.sampler == "balanced":
        recs, strata = data.train_records, cfg.train.strata
        cells = [f"{r.source}|{r.attribute(strata)}" if strata else r.source for r in recs]
        w = balanced_weights([r.label for r in recs], cells)
        return torch.multinomial(w, n, replacement=True, generator=gen).tolist()
    return torch.randperm(n, generator=gen).tolist()


def rank_share(order: list[int], rank: int, world: int) -> list[int]:
    """Positions ``rank, rank + world, ...`` of ``order``: the processes' shares cover the epoch exactly
    once (no padding, no overlap), and batch ``k`` of every process together is batch ``k`` of one
    process with ``world`` times the batch size."""
    return order[rank::world]


def num_workers(cfg: Config, device: torch.device) -> int:
    """``data.num_workers``; -1 = 0 on CPU (compute-bound, measured) and min(8, cores) on CUDA."""
    if cfg.data.num_workers >= 0:
        return cfg.data.num_workers
    return min(8, os.cpu_count() or 1) if device.type == "cuda" else 0


class DeviceBatches:
    """Training batches drawn from images already on the training device and augmented there as a
    batch (``train.device_data``): no per-image CPU work and no host-to-device copy per step.

    ``order``: this process's positions for the epoch (:func:`epoch_order`, :func:`rank_share`);
    batches from ``start`` on (a resumed epoch). Batch ``b``'s augmentation draws from ``gen``
    seeded with ``(seed, b)``, so a resumed epoch augments its remaining batches as an
    uninterrupted one would. Items are dicts like :class:`ScanDataset`'s: ``image``
    (``N x 1 x S x S`` uint8), ``label``, ``index``.
    """

    def __init__(
        self, images, labels, ds: ScanDataset, order: list[int], batch_size: int, drop_last: bool, aug, gen,
        *, seed: int = 0, start: int = 0,
    ):  # fmt: skip
        self.images, self.labels = images, labels
        self.rows = torch.as_tensor(ds.indices, device=images.device)[torch.as_tensor(order, device=images.device)]
        self.batch_size, self.aug, self.gen, self.seed, self.start = batch_size, aug, gen, seed, start
        n = len(order)
        self.n_batches = n // batch_size if drop_last else -(-n // batch_size)

    def __len__(self) -> int:
        return self.n_batches - self.start

    def __iter__(self):
        for b in range(self.start, self.n_batches):
            rows = self.rows[b * self.batch_size : (b + 1) * self.batch_size]
            x = self.images[rows]
            if self.aug is not None:
                self.gen.manual_seed(self.seed * 1_000_003 + b)
                x = batch_augment(x, self.aug, self.gen)
            yield {"image": x, "label": self.labels[rows], "index": rows}


def device_loader(cfg: Config, data: TrainData, order: list[int], device, seed: int, start: int = 0) -> DeviceBatches:
    """The ``train.device_data`` counterpart of the training DataLoader (images moved once, then reused)."""
    if not isinstance(data.store, ImageStore):
        raise ConfigError("train.device_data needs the images in memory; it does not stream a packed dataset")
    if data.device_images is None:
        data.device_images = data.store.images.to(device)
        data.device_labels = torch.as_tensor(data.train.targets, device=device)
    gen = torch.Generator(device=device)
    aug = cfg.augment if cfg.augment.enabled else None
    return DeviceBatches(
        data.device_images, data.device_labels, data.train, order, cfg.train.batch_size,
        len(order) > cfg.train.batch_size, aug, gen, seed=seed, start=start,
    )  # fmt: skip

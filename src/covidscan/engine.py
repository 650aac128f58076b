"""The one training loop, for every backbone, head and task, made of small named parts.

``train(cfg, data, out)`` reads like the recipe::

    run = RunContext.from_env(...)            # device, torchrun ranks
    split = make_split(...)                   # leak-free, grouped by default
    model = build_model(...)                  # before anything is written: a missing weights file
    data = build_datasets(...)                #   or an unreadable dataset leaves no half-made run
    keeper = CheckpointKeeper(out, ...)       # best / last checkpoints, history, early stopping, resume
    for epoch:
        train_one_epoch(...) -> {"train_loss", "train_acc", ...}
        validate(...)        -> {"val_loss", "val_acc"}
        keeper.update(...)   -> stop?

Files in ``out``: ``config.yaml`` (resolved), ``split.csv``, ``history.jsonl`` (one line per
epoch), ``best.pt`` and ``last.pt``. A folder that already holds a run is refused unless
``resume`` (continue it) or ``overwrite`` (start again). ``resume=True`` continues from
``last.pt``, or from ``step.pt`` (``train.checkpoint_every`` steps) when a run stopped in the
middle of an epoch, and ends with the same weights as an uninterrupted run (same seed, CPU):
every epoch's order and dropout draw from generators seeded by ``(seed, epoch)``, each image's
augmentation from ``(seed, epoch, image)``, and a step checkpoint keeps the random state and the
epoch's running metrics. Under ``torchrun`` it trains with DistributedDataParallel: every process
computes the same epoch order and takes every ``world``-th position (:func:`rank_share`; no
padding, DDP's ``join`` for a last batch only some processes have), gradients are averaged
across processes, and validation and checkpoints happen on rank 0. ``data`` may be a packed
folder (``covidscan pack``): images are then read from its shards as batches are made.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from covidscan.adapt import batchnorm_statistics
from covidscan.appearance import appearance_reference
from covidscan.checkpoint import CheckpointMeta, library_versions, load_checkpoint, save_checkpoint
from covidscan.config import Config, config_diff, config_from_dict, save_config
from covidscan.data import Split, exclude_sources, grouped_split, load_dataset, paper_split, read_split, write_split
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
from covidscan.evaluation import predict_loader
from covidscan.models import build_model
from covidscan.provenance import fingerprints, provenance_record
from covidscan.reports import plot_history
from covidscan.runtime import RunContext, autocast_for

logger = logging.getLogger(__name__)

REFERENCE_IMAGES = 4096  # training images behind the appearance reference (all of a smaller set)
RUN_FILES = ("best.pt", "last.pt", "step.pt", "history.jsonl")
#: settings that may change when a run is resumed (they do not change what was already trained)
RESUMABLE = {
    "train.epochs", "train.early_stopping", "train.device", "train.checkpoint_every",
    "data.num_workers", "data.cache", "data.cache_dir",
}  # fmt: skip


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


# --- the run folder -------------------------------------------------------------------------


def check_run_folder(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to write a new run over an existing one unless asked to.

    Raises:
        ConfigError: ``out`` holds a run and neither ``resume`` nor ``overwrite`` is set,
            or both are set.
    """
    if resume and overwrite:
        raise ConfigError("--resume continues a run and --overwrite starts it again: choose one")
    found = [n for n in RUN_FILES if (out / n).exists()]
    if found and not (resume or overwrite):
        raise ConfigError(
            f"{out} already holds a run ({', '.join(found)}); use --resume to continue it, "
            "--overwrite to replace it, or another --out"
        )


def resumed_config(saved: Config, asked: Config | None, where: Path) -> Config:
    """The config of a resumed run: the saved one, with the changes in :data:`RESUMABLE` taken from ``asked``.

    Raises:
        ConfigError: ``asked`` changes a setting that would make the resumed run another run
            (listing every such difference), or lowers ``train.epochs`` below the epochs done.
    """
    if asked is None:
        return saved
    diff = {k: v for k, v in config_diff(saved, asked).items() if k != "name"}
    refused = {k: v for k, v in diff.items() if k not in RESUMABLE}
    if refused:
        listed = "; ".join(f"{k}: saved {a!r}, asked {b!r}" for k, (a, b) in sorted(refused.items()))
        raise ConfigError(f"{where}: cannot resume with other settings ({listed}); start a new run with another --out")
    if diff:
        logger.info("resume: changed %s", ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items())))
    return config_from_dict({**asked.to_dict(), "name": saved.name}, str(where))


# --- data -----------------------------------------------------------------------------------


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


# --- one epoch, validation --------------------------------------------------------------------


def make_optimizer(cfg: Config, model) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def class_weights(cfg: Config, labels: list[int], num_classes: int, device) -> torch.Tensor | None:
    """Inverse class frequency in train (``train.class_weights``), else None."""
    if not cfg.train.class_weights:
        return None
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    return torch.tensor(counts.sum() / np.maximum(counts, 1) / len(counts), dtype=torch.float32, device=device)


@dataclass
class EpochProgress:
    """Where an epoch stands: optimizer steps done and the running sums behind its train metrics."""

    step: int = 0
    seen: int = 0
    loss_sum: float = 0.0
    correct: int = 0

    def metrics(self) -> dict:
        n = max(self.seen, 1)
        return {"train_loss": self.loss_sum / n, "train_acc": self.correct / n, "seen": self.seen}


def train_one_epoch(
    net, loader, optimizer, *, pre, device, autocast, class_w=None, channels_last=False, max_batches=0, bar=None,
    progress: EpochProgress | None = None, on_step=None, mixup: float = 0.0,
) -> dict:  # fmt: skip
    """One pass over ``loader``; returns ``{"train_loss", "train_acc", "seen"}`` (means over images).

    ``mixup`` > 0: each batch is blended with a shuffled copy of itself, ``lam * x + (1 - lam) * x[perm]``
    with ``lam ~ Beta(mixup, mixup)`` drawn from the global generator (seeded per epoch), and the loss is
    the same blend of the two labels' cross-entropies; accuracy is counted against the unshuffled labels.

    ``progress``: continue an epoch resumed after ``progress.step`` steps (``loader`` then yields the
    remaining batches only); ``on_step(progress)`` is called after every optimizer step.
    """
    p = progress or EpochProgress()
    for batch in loader:
        if max_batches and p.step >= max_batches:
            break
        x = model_input(batch["image"], pre, device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = batch["label"].to(device, non_blocking=True)
        lam, perm = 1.0, None
        if mixup > 0 and y.numel() > 1:
            lam = float(torch.distributions.Beta(mixup, mixup).sample())
            perm = torch.randperm(y.numel()).to(device)
            x = lam * x + (1 - lam) * x[perm]
        with autocast():
            logits = net(x)
        loss = F.cross_entropy(logits.float(), y, weight=class_w)
        if perm is not None:
            loss = lam * loss + (1 - lam) * F.cross_entropy(logits.float(), y[perm], weight=class_w)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = y.numel()
        p.step += 1
        p.seen += n
        p.loss_sum += loss.item() * n
        p.correct += (logits.argmax(1) == y).sum().item()
        if bar is not None:
            bar.update()
            bar.set_postfix(loss=f"{p.loss_sum / p.seen:.4f}", acc=f"{p.correct / p.seen:.3f}")
        if on_step is not None:
            on_step(p)
    return p.metrics()


def validate(net, loader, *, pre, device, autocast) -> dict:
    """``{"val_loss", "val_acc"}`` over the whole validation set."""
    probs, ys, _, val_loss = predict_loader(net, loader, device, autocast, pre)
    return {"val_loss": val_loss, "val_acc": float((probs.argmax(1) == ys).mean()) if len(ys) else 0.0}


def precise_bn(model, data: TrainData, n: int, seed: int) -> None:
    """Re-estimate BatchNorm statistics on ``n`` training images (unaugmented, a seeded draw), so the
    epoch is validated and saved with the statistics of the data, not an average lagging behind."""
    rows = torch.tensor(data.train.indices)
    pick = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:n]]
    batchnorm_statistics(model, data.store.images[pick.sort().values], data.pre, batch_size=64)


# --- checkpoints ----------------------------------------------------------------------------


def _cpu_state(model) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class CheckpointKeeper:
    """Owns ``best.pt``, ``last.pt`` and ``history.jsonl``, the best epoch and early stopping.

    ``update`` is called once per epoch on the main process with that epoch's metrics; it
    appends the history line, saves ``best.pt`` when the monitored value improved and
    ``last.pt`` (with the optimizer and this keeper's state, for resuming) every epoch, and
    returns True when early stopping says stop.
    """

    def __init__(
        self, out: Path, meta: CheckpointMeta, *, monitor: str = "val_loss", patience: int = 0, provenance: dict | None = None
    ):
        self.out, self.meta, self.provenance = out, meta, provenance
        self.monitor, self.patience = monitor, patience
        self.higher_better = monitor == "val_acc"
        self.best_value, self.best_epoch, self.bad_epochs = None, 0, 0
        self.best_metrics: dict = {}
        self.history: list[dict] = []
        self.swa: AveragedModel | None = None  # saved with the train state, so a resumed run averages on

    @property
    def best_path(self) -> Path:
        return self.out / "best.pt"

    @property
    def last_path(self) -> Path:
        return self.out / "last.pt"

    @property
    def step_path(self) -> Path:
        return self.out / "step.pt"

    def save_step(self, epoch: int, progress: EpochProgress, model, optimizer) -> None:
        """``step.pt``: the model in the middle of ``epoch`` after ``progress.step`` steps, with what
        resuming needs to end as an uninterrupted run would (optimizer, running metrics, random state).
        Written atomically: a run killed while writing keeps the previous one."""
        ts = self.state(optimizer, epoch - 1)
        ts["in_epoch"] = {"epoch": epoch, "progress": dataclasses.asdict(progress), "rng": torch.get_rng_state()}
        meta = self.meta.replace(epoch=epoch - 1, val_metrics={"step": progress.step})
        save_checkpoint(self.step_path, _cpu_state(model), meta, ts, provenance=self.provenance)

    def state(self, optimizer, epoch: int) -> dict:
        return {
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "best_metrics": self.best_metrics,
            "history": self.history,
            **({"swa": _cpu_state(self.swa)} if self.swa is not None else {}),
        }

    def restore(self, ts: dict) -> tuple[int, dict | None]:
        """Take the train state of ``last.pt`` or ``step.pt``; returns the epoch to run and, for a
        step checkpoint, where in that epoch to continue (``run_epoch``'s ``resume``)."""
        self.best_value, self.best_epoch, self.bad_epochs = ts["best_value"], ts["best_epoch"], ts["bad_epochs"]
        self.best_metrics, self.history = ts["best_metrics"], list(ts["history"])
        if self.swa is not None and "swa" in ts:
            self.swa.load_state_dict(ts["swa"])
        return ts["epoch"] + 1, ts.get("in_epoch")

    def save_average(self, model, row: dict) -> None:
        """``best.pt`` := the weight average (``train.swa_start``), validated as ``row``; the epoch
        checkpoints stay in ``last.pt`` and the history."""
        self.best_metrics = {"val_loss": row["val_loss"], "val_acc": row["val_acc"], "epoch": self.history[-1]["epoch"]}
        self.best_metrics["averaged_steps"] = row["averaged_steps"]
        self.best_epoch = self.history[-1]["epoch"]
        meta = self.meta.replace(epoch=self.best_epoch, val_metrics=self.best_metrics)
        save_checkpoint(self.best_path, _cpu_state(model), meta, provenance=self.provenance)

    def update(self, epoch: int, row: dict, model, optimizer) -> bool:
        self.history.append(row)
        with open(self.out / "history.jsonl", "a" if epoch > 1 else "w", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        value = row[self.monitor]
        improved = self.best_value is None or (value > self.best_value if self.higher_better else value < self.best_value)
        state = _cpu_state(model)
        if improved:
            self.best_value, self.best_epoch, self.bad_epochs = value, epoch, 0
            self.best_metrics = {"val_loss": row["val_loss"], "val_acc": row["val_acc"], "epoch": epoch}
            save_checkpoint(
                self.best_path, state, self.meta.replace(epoch=epoch, val_metrics=self.best_metrics), provenance=self.provenance
            )
        else:
            self.bad_epochs += 1
        save_checkpoint(
            self.last_path, state, self.meta.replace(epoch=epoch, val_metrics=row), self.state(optimizer, epoch),
            provenance=self.provenance,
        )  # fmt: skip
        self.step_path.unlink(missing_ok=True)  # the epoch is complete: last.pt is the newer state
        if self.patience and self.bad_epochs >= self.patience:
            logger.info("early stopping: no %s improvement for %d epochs", self.monitor, self.bad_epochs)
            return True
        return False


def _split_fingerprint(split: Split) -> str:
    h = hashlib.sha256()
    for rec, s in sorted(zip(split.index.records, split.assignment), key=lambda t: str(t[0].path)):
        h.update(f"{rec.path.name},{s}\n".encode())
    return h.hexdigest()


def training_record(data: TrainData) -> dict:
    """Fingerprints of the readable training and validation images (:mod:`covidscan.provenance`),
    stored in every checkpoint of the run so later evaluations can say what the model has seen."""
    valid = data.store.valid
    return provenance_record(
        fingerprints(data.store.images, [i for i in data.train.indices if valid[i]]),
        fingerprints(data.store.images, [i for i in data.val.indices if valid[i]]),
        data.pre.image_size,
    )


def checkpoint_meta(
    cfg: Config, split: Split, data: TrainData, backbone: str, weights_source: str, record: dict | None = None
) -> CheckpointMeta:
    """Everything a checkpoint of this run records about itself (:class:`CheckpointMeta`)."""
    index = split.index
    valid_train = [k for k in data.train.indices if data.store.valid[k]]
    valid_train = valid_train[:: max(1, -(-len(valid_train) // REFERENCE_IMAGES))]  # evenly spaced, at most 4096 images
    return CheckpointMeta(
        task=index.task,
        class_names=tuple(index.class_names),
        backbone=backbone,
        head=cfg.model.head,
        preprocess=data.pre,
        weights_source=weights_source,
        config=cfg.to_dict(),
        reference=appearance_reference(data.store.images[valid_train], record),
        data_fingerprint=index.fingerprint(),
        split_fingerprint=_split_fingerprint(split),
        split_protocol=split.protocol,
        grouping=index.grouping,
        train_counts=split.counts(),
        sources=sorted({r.source for r in index.records}),
        class_sources=index.sources(),
        data_origins=[str(o) for o in index.origins],
        versions=library_versions(),
    )


# --- the loop -------------------------------------------------------------------------------


def resume_state(out: Path) -> dict:
    """The newest resumable state of the run in ``out``: ``step.pt`` when it is ahead of ``last.pt``
    (a run stopped in the middle of an epoch), else ``last.pt``.

    Raises:
        ConfigError: neither file holds a training state.
    """
    found = {}
    for name in ("last.pt", "step.pt"):
        if (out / name).is_file():
            obj = load_checkpoint(out / name)
            if "train_state" not in obj:
                raise ConfigError(f"{out / name}: holds no training state to resume from")
            found[name] = obj
    if not found:
        raise ConfigError(f"{out}: nothing to resume (no last.pt or step.pt)")
    if "step.pt" in found and (
        "last.pt" not in found or found["step.pt"]["train_state"]["epoch"] >= found["last.pt"]["train_state"]["epoch"]
    ):
        ts = found["step.pt"]["train_state"]
        logger.info("resuming from step %d of epoch %d", ts["in_epoch"]["progress"]["step"], ts["in_epoch"]["epoch"])
        return found["step.pt"]
    return found["last.pt"]


def train(
    cfg: Config | None,
    data=None,
    out: str | Path = "runs/run",
    *,
    split_file: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    stop_after_epoch: int | None = None,
) -> TrainResult:
    """Train ``cfg`` on ``data`` (folders / manifests) into ``out``; see the module docstring.

    With ``resume``, ``cfg`` may be None (the saved config) or the saved config with
    :data:`RESUMABLE` changes (more epochs, say). ``stop_after_epoch`` ends the run early as
    if interrupted (for tests of ``resume``).

    Raises:
        ConfigError: ``out`` holds a run (without resume / overwrite), or resume asks for other settings.
        DataError, ImageReadError, FileNotFoundError: the data cannot be used.
        WeightsUnavailableError: ImageNet weights asked for and none found (nothing written then).
    """
    out = Path(out)
    t_start = time.perf_counter()
    if cfg is not None:
        _check_logger(cfg)  # before anything is written
    check_run_folder(out, resume=resume, overwrite=overwrite)
    state = None
    if resume:
        state = resume_state(out)
        saved = config_from_dict(state["meta"].config, str(out / "last.pt"))
        cfg = resumed_config(saved, cfg, out)
        split_file = out / "split.csv"
    if cfg is None:
        raise ConfigError("train needs a config")
    run = RunContext.from_env(cfg.train.device)
    split = make_split(cfg, data, Path(split_file) if split_file else None)
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        torch.manual_seed(cfg.train.seed)
        model, weights_source = build_model(
            cfg.model.backbone,
            cfg.model.head,
            len(split.index.class_names),
            weights=cfg.model.weights,
            download=cfg.model.download,
            dropout=None if cfg.model.dropout < 0 else cfg.model.dropout,
        )
        pre = Preprocess.from_config(model.spec, cfg.data, cfg.study)
        train_data = build_datasets(cfg, split, pre, progress=progress and run.is_main)
        # everything that can fail on bad input has run: only now is the run folder written, and only
        # once every process has checked it (else a slower rank would find the files rank 0 just wrote)
        if run.distributed:
            dist.barrier()
        if run.is_main:
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.yaml")
            if not resume:  # a new run (or --overwrite): nothing of an older run may mix with it
                for name in RUN_FILES:
                    (out / name).unlink(missing_ok=True)
                write_split(split, out / "split.csv")
            logger.info("split (%s):\n%s", split.protocol, split.format_counts())
        record = training_record(train_data)
        meta = checkpoint_meta(cfg, split, train_data, cfg.model.backbone, weights_source, record)
        keeper = CheckpointKeeper(out, meta, monitor=cfg.train.monitor, patience=cfg.train.early_stopping, provenance=record)
        result = _fit(cfg, model, train_data, keeper, run, state, progress, stop_after_epoch, t_start)
    run.finish()
    return result


@dataclass
class Fitting:
    """What the epochs run with, once the model is on its device."""

    net: torch.nn.Module  # what the batches go through: the model, its head (feature cache) or DDP
    fast: bool  # frozen-backbone feature cache in use
    optimizer: torch.optim.Optimizer
    class_w: torch.Tensor | None
    workers: int
    swa: AveragedModel | None = None  # train.swa_start: running average of the weights


def prepare(cfg: Config, model, data: TrainData, run: RunContext) -> Fitting:
    """Frozen parts, device, memory format, optimizer, feature cache and DDP wrapping."""
    device = run.device
    if cfg.model.freeze_backbone:
        model.backbone.requires_grad_(False)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
    model.to(device)
    if cfg.train.channels_last:  # NHWC: measured +24% InceptionV3 training on CPU, neutral for DenseNet
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model)
    class_w = class_weights(cfg, data.train.labels(), model.head.fc.out_features, device)
    net, fast, workers = model, uses_feature_cache(cfg, run), num_workers(cfg, device)
    if cfg.model.freeze_backbone and cfg.train.feature_cache and cfg.augment.enabled:
        logger.info("feature cache off: augmentation changes the backbone's input every epoch")
    if fast:  # same batches, same dropout draws as the full loop: equivalent up to float rounding
        data.train = FeatureDataset(backbone_features(model, data.train, device, cfg), data.train)
        data.val = FeatureDataset(backbone_features(model, data.val, device, cfg), data.val)
        net, workers = model.head, 0
    if run.distributed:
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    swa = AveragedModel(model, use_buffers=False) if cfg.train.swa_start else None
    return Fitting(net, fast, optimizer, class_w, workers, swa)


def _autocast(cfg: Config, device):
    return lambda: autocast_for(device, amp=cfg.train.amp, cpu_bf16=cfg.train.cpu_bf16)


def _val_loader(cfg: Config, data: TrainData, fit: Fitting, device):
    return scan_loader(
        data.val, batch_size=max(cfg.train.batch_size, 32), shuffle=False, num_workers=fit.workers,
        pin_memory=device.type == "cuda",
    )  # fmt: skip


def run_epoch(
    cfg: Config, epoch: int, model, fit: Fitting, data: TrainData, run: RunContext, keeper: CheckpointKeeper, *,
    progress: bool, resume: dict | None = None,
) -> bool:  # fmt: skip
    """Train one epoch, validate and checkpoint on the main process; True when training should stop.

    ``resume``: the train state of a step checkpoint of this epoch; the epoch continues after its
    last step with its running metrics and random state.
    """
    t0, device = time.perf_counter(), run.device
    seed = cfg.train.seed * 100_003 + epoch
    torch.manual_seed(seed)  # inside train()'s fork_rng: dropout of this epoch
    gen = torch.Generator().manual_seed(seed)
    order = rank_share(epoch_order(cfg, data, gen), run.rank, run.world)
    bs = cfg.train.batch_size
    drop_last = len(order) > bs
    done = EpochProgress()
    seen_before = 0
    if resume is not None:
        done = EpochProgress(**resume["progress"])
        torch.set_rng_state(resume["rng"])
        seen_before = done.seen
    if isinstance(data.train, ScanDataset):
        data.train.seed = seed  # augmentation: one draw per (epoch, image), whatever process or worker loads it
    loader_kw = dict(num_workers=fit.workers, pin_memory=device.type == "cuda")
    if cfg.train.device_data and not fit.fast:
        loader = device_loader(cfg, data, order, device, seed, start=done.step)
    else:
        # generator=gen: the loader's worker seed is not drawn from the global generator (dropout's)
        rest = order[done.step * bs :]
        loader = scan_loader(data.train, batch_size=bs, sampler=rest, drop_last=drop_last, generator=gen, **loader_kw)
    autocast = _autocast(cfg, device)
    fit.net.train()
    if cfg.model.freeze_backbone:
        model.backbone.eval()  # frozen batch-norm statistics too
    bar = (
        tqdm(total=len(loader), desc=f"epoch {epoch}/{cfg.train.epochs}", unit="batch", leave=False)
        if progress and run.is_main
        else None
    )
    every, averaging = cfg.train.checkpoint_every, fit.swa is not None and epoch >= cfg.train.swa_start

    def on_step(p: EpochProgress) -> None:
        if averaging:
            fit.swa.update_parameters(model)
        if every and run.is_main and p.step % every == 0:
            keeper.save_step(epoch, p, model, fit.optimizer)

    with fit.net.join() if isinstance(fit.net, DDP) else nullcontext():  # processes may get one batch more or less
        done = train_one_epoch(
            fit.net, loader, fit.optimizer, pre=data.pre, device=device, autocast=autocast, class_w=fit.class_w,
            channels_last=cfg.train.channels_last and not fit.fast, max_batches=cfg.train.max_batches, bar=bar,
            progress=done, on_step=on_step if averaging or every else None, mixup=cfg.train.mixup,
        )  # fmt: skip
    if bar is not None:
        bar.close()
    if cfg.train.precise_bn and not cfg.model.freeze_backbone:
        precise_bn(model, data, cfg.train.precise_bn, seed)
    train_secs = time.perf_counter() - t0
    stop = torch.zeros(1)
    if run.is_main:
        val_loader = _val_loader(cfg, data, fit, device)
        row = {"epoch": epoch, "train_loss": done["train_loss"], "train_acc": done["train_acc"]}
        row.update(validate(fit.net if fit.fast else model, val_loader, pre=data.pre, device=device, autocast=autocast))
        row.update(train_images_per_s=(done["seen"] - seen_before) / max(train_secs, 1e-9), seconds=time.perf_counter() - t0)
        if device.type == "cuda":
            row["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        logger.info(
            "epoch %d/%d  train loss %.4f acc %.3f  val loss %.4f acc %.3f  (%.0fs)",
            epoch, cfg.train.epochs, row["train_loss"], row["train_acc"], row["val_loss"], row["val_acc"], row["seconds"],
        )  # fmt: skip
        stop[0] = float(keeper.update(epoch, row, model, fit.optimizer))
    if run.distributed:
        dist.broadcast(stop, src=0)
    return bool(stop.item())


def finish_average(cfg: Config, model, fit: Fitting, data: TrainData, run: RunContext, keeper: CheckpointKeeper) -> None:
    """The averaged weights (``train.swa_start``) in ``model``'s architecture: BatchNorm statistics
    re-estimated on training images (the average of the weights is not the average of their
    statistics; a frozen backbone keeps its own), validated, and saved as ``best.pt``."""
    avg = fit.swa.module
    if not cfg.model.freeze_backbone:
        precise_bn(avg, data, cfg.train.precise_bn or 1024, seed=cfg.train.seed * 100_003)
    device = run.device
    loader = _val_loader(cfg, data, fit, device)
    row = validate(avg.head if fit.fast else avg, loader, pre=data.pre, device=device, autocast=_autocast(cfg, device))
    row["averaged_steps"] = int(fit.swa.n_averaged)
    logger.info(
        "weight average of %d steps from epoch %d: val loss %.4f acc %.3f (saved as best.pt)",
        row["averaged_steps"], cfg.train.swa_start, row["val_loss"], row["val_acc"],
    )  # fmt: skip
    keeper.save_average(avg, row)


def tensorboard_writer(cfg: Config, out: Path, run: RunContext):
    """A SummaryWriter in ``out/tensorboard`` when ``train.log=tensorboard`` (main process only), else None."""
    if cfg.train.log != "tensorboard" or not run.is_main:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(out / "tensorboard"))


def _check_logger(cfg: Config) -> None:
    if cfg.train.log == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("train.log=tensorboard needs the tensorboard package: pip install tensorboard") from None


def _log_epoch(writer, row: dict) -> None:
    """Scalars of one history row: train_* and val_* under train/ and val/, the rest under misc/."""
    epoch = int(row["epoch"])
    for key, value in row.items():
        if key == "epoch" or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        group, _, name = key.partition("_") if key.startswith(("train_", "val_")) else ("misc", "", key)
        writer.add_scalar(f"{group}/{name}", value, epoch)
    writer.flush()


def _fit(
    cfg: Config, model, data: TrainData, keeper: CheckpointKeeper, run: RunContext, state, progress, stop_after_epoch, t_start
) -> TrainResult:
    fit = prepare(cfg, model, data, run)
    keeper.swa = fit.swa
    writer = tensorboard_writer(cfg, keeper.out, run)
    start_epoch, in_epoch = 1, None
    if state is not None:
        model.load_state_dict(state["state_dict"])
        fit.optimizer.load_state_dict(state["train_state"]["optimizer"])
        start_epoch, in_epoch = keeper.restore(state["train_state"])
        logger.info("resuming %s at epoch %d", keeper.out, start_epoch)
    for epoch in range(start_epoch, cfg.train.epochs + 1):
        stop = run_epoch(cfg, epoch, model, fit, data, run, keeper, progress=progress, resume=in_epoch)
        in_epoch = None
        if writer is not None and keeper.history:
            _log_epoch(writer, keeper.history[-1])
        if stop or (stop_after_epoch is not None and epoch >= stop_after_epoch):
            break
    if writer is not None:
        writer.close()
    if fit.swa is not None and run.is_main and int(fit.swa.n_averaged) > 0:
        finish_average(cfg, model, fit, data, run, keeper)
    if run.is_main and keeper.history:
        plot_history(keeper.history, keeper.out / "curves.png")
    return TrainResult(
        out=keeper.out,
        best_checkpoint=keeper.best_path,
        last_checkpoint=keeper.last_path,
        best_epoch=keeper.best_epoch,
        best_metrics=keeper.best_metrics,
        weights_source=keeper.meta.weights_source,
        seconds=time.perf_counter() - t_start,
        history=keeper.history,
    )

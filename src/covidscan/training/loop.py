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

import csv
import io
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from covidscan.config import Config, config_from_dict, save_config
from covidscan.data import write_split
from covidscan.data.dataset import (
    FeatureDataset,
    ScanDataset,
    scan_loader,
)
from covidscan.data.transforms import Preprocess
from covidscan.errors import ConfigError
from covidscan.models import build_model, get_backbone
from covidscan.reports import plot_history
from covidscan.results import atomic_write
from covidscan.runtime import RunContext, autocast_for
from covidscan.training.adversary import SourceAdversary
from covidscan.training.data import (
    TrainData,
    backbone_features,
    build_datasets,
    device_loader,
    epoch_order,
    make_split,
    num_workers,
    rank_share,
    uses_feature_cache,
)
from covidscan.training.keeper import (
    RUN_FILES,
    CheckpointKeeper,
    check_resumed_data,
    check_run_folder,
    checkpoint_meta,
    resume_state,
    resumed_config,
    training_record,
)
from covidscan.training.mixstyle import mixing_styles
from covidscan.training.steps import EpochProgress, class_weights, make_optimizer, precise_bn, train_one_epoch, validate

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


# --- data -----------------------------------------------------------------------------------


# --- checkpoints ----------------------------------------------------------------------------


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
        check_resumed_data(state["meta"], data, cfg.data.task, out)
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
            if train_data.store.skipped:  # unreadable images were left out: say which, beside the run
                buf = io.StringIO()
                csv.writer(buf).writerows([("file", "reason"), *train_data.store.skipped])
                atomic_write(out / "skipped.csv", buf.getvalue())
                logger.warning("%d unreadable image(s) left out: %s", len(train_data.store.skipped), out / "skipped.csv")
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
    writer: object | None = None  # train.log=tensorboard: a SummaryWriter (main process only)
    adversary: SourceAdversary | None = None  # train.adversary: the source adversary (never part of the model)


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
    return Fitting(net, fast, optimizer, class_w, workers, swa, adversary=source_adversary(cfg, model, data, run))


def source_adversary(cfg: Config, model, data: TrainData, run: RunContext) -> SourceAdversary | None:
    """``train.adversary`` > 0: a conditional source adversary over the training images' sources, ramped over
    every optimisation step of the run (one process only: its gradients are not shared between processes)."""
    if not cfg.train.adversary:
        return None
    if run.distributed:
        raise ConfigError("train.adversary runs on one process only (its own gradients are not all-reduced)")
    recs = data.train_records
    if len({r.source for r in recs}) < 2:
        logger.warning("train.adversary: the training images come from one source; nothing to make unguessable")
    per_epoch = max(len(data.train) // cfg.train.batch_size, 1)  # run_epoch drops the last partial batch
    if cfg.train.max_batches:
        per_epoch = min(per_epoch, cfg.train.max_batches)
    return SourceAdversary.for_training(
        model, data.train.indices, data.train.labels(), [r.source for r in recs], len(data.store.images),
        weight=cfg.train.adversary, total_steps=cfg.train.epochs * per_epoch,
    )  # fmt: skip


def _autocast(cfg: Config, device):
    return lambda: autocast_for(device, amp=cfg.train.amp, cpu_bf16=cfg.train.cpu_bf16)


def _val_loader(cfg: Config, data: TrainData, fit: Fitting, device):
    return scan_loader(
        data.val, batch_size=max(cfg.train.batch_size, 32), shuffle=False, num_workers=fit.workers,
        pin_memory=device.type == "cuda",
    )  # fmt: skip


def step_hook(cfg: Config, epoch: int, model, fit: Fitting, run: RunContext, keeper: CheckpointKeeper, per_epoch: int):
    """What happens after each optimizer step, or None when nothing does: the weight average (``train.swa_start``),
    a step checkpoint every ``train.checkpoint_every`` steps, the running loss and learning rate in TensorBoard."""
    every, averaging = cfg.train.checkpoint_every, fit.swa is not None and epoch >= cfg.train.swa_start
    if not (averaging or every or fit.writer is not None):
        return None

    def on_step(p: EpochProgress) -> None:
        if averaging:
            fit.swa.update_parameters(model)
        if every and run.is_main and p.step % every == 0:
            keeper.save_step(epoch, p, model, fit.optimizer)
        if fit.writer is not None:
            step = (epoch - 1) * per_epoch + p.step
            fit.writer.add_scalar("step/train_loss_running", p.loss_sum / max(p.seen, 1), step)
            fit.writer.add_scalar("step/lr", fit.optimizer.param_groups[0]["lr"], step)

    return on_step


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
    # this epoch's view of the training set: augmentation drawn per (epoch, image), whatever process or worker
    # loads it; the dataset itself is never changed
    epoch_set = data.train.for_epoch(seed) if isinstance(data.train, ScanDataset) else data.train
    loader_kw = dict(num_workers=fit.workers, pin_memory=device.type == "cuda")
    if cfg.train.device_data and not fit.fast:
        loader = device_loader(cfg, data, order, device, seed, start=done.step)
    else:
        # generator=gen: the loader's worker seed is not drawn from the global generator (dropout's)
        rest = order[done.step * bs :]
        loader = scan_loader(epoch_set, batch_size=bs, sampler=rest, drop_last=drop_last, generator=gen, **loader_kw)
    autocast = _autocast(cfg, device)
    fit.net.train()
    if cfg.model.freeze_backbone:
        model.backbone.eval()  # frozen batch-norm statistics too
    bar = (
        tqdm(total=len(loader), desc=f"epoch {epoch}/{cfg.train.epochs}", unit="batch", leave=False)
        if progress and run.is_main
        else None
    )
    per_epoch = -(-len(order) // bs) if not drop_last else len(order) // bs
    on_step = step_hook(cfg, epoch, model, fit, run, keeper, per_epoch)
    # MixStyle hooks live only for the optimisation steps: precise BN, validation and checkpoints never see them
    styles = mixing_styles(model, get_backbone(cfg.model.backbone).style_layers, 0.0 if fit.fast else cfg.train.mixstyle)
    # the source adversary likewise: attached for the optimisation steps only
    adversary = fit.adversary.attached(model) if fit.adversary is not None else nullcontext()
    with fit.net.join() if isinstance(fit.net, DDP) else nullcontext(), styles, adversary as adv:
        done = train_one_epoch(
            fit.net, loader, fit.optimizer, pre=data.pre, device=device, autocast=autocast, class_w=fit.class_w,
            channels_last=cfg.train.channels_last and not fit.fast, max_batches=cfg.train.max_batches, bar=bar,
            progress=done, on_step=on_step, mixup=cfg.train.mixup, adversary=adv,
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
        if fit.adversary is not None:  # how well the adversary guessed the source this epoch
            row.update(fit.adversary.metrics())
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
    writer = fit.writer = tensorboard_writer(cfg, keeper.out, run)
    if writer is not None:  # the hyper-parameters, once: the resolved config as text
        writer.add_text("config", "```\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False) + "```")
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
        flat = {f"{k}.{kk}": vv for k, v in cfg.to_dict().items() if isinstance(v, dict) for kk, vv in v.items()}
        hparams = {k: v for k, v in flat.items() if isinstance(v, int | float | str | bool)}
        writer.add_hparams(hparams, {"hparam/best_val_loss": keeper.best_value or float("nan")}, run_name="hparams")
        writer.close()
    if fit.swa is not None and run.is_main and int(fit.swa.n_averaged) > 0:
        finish_average(cfg, model, fit, data, run, keeper)
    if run.is_main and keeper.history:
        plot_history(keeper.history, keeper.out / "curves.png", chosen=keeper.best_epoch)
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

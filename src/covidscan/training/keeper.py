"""The run folder: what a run may overwrite or resume, and the keeper of its checkpoints, history and metadata."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel

from covidscan.appearance import appearance_reference
from covidscan.checkpoint import CheckpointMeta, library_versions, load_checkpoint, save_checkpoint
from covidscan.config import Config, config_diff, config_from_dict
from covidscan.data import Split, exclude_sources, load_dataset, read_split
from covidscan.errors import ConfigError
from covidscan.provenance import fingerprints, provenance_record
from covidscan.training.data import TrainData
from covidscan.training.steps import EpochProgress

logger = logging.getLogger(__name__)


REFERENCE_IMAGES = 4096  # training images behind the appearance reference (all of a smaller set)


RUN_FILES = ("best.pt", "last.pt", "step.pt", "history.jsonl")


#: settings that may change when a run is resumed (they do not change what was already trained)
RESUMABLE = {
    "train.epochs", "train.early_stopping", "train.device", "train.checkpoint_every",
    "data.num_workers", "data.cache", "data.cache_dir",
}  # fmt: skip


def check_run_folder(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to write a new run over an existing one unless asked to.

    Raises:
        ConfigError: ``out`` holds a run and neither ``resume`` nor ``overwrite`` is set,
            or both are set.
    """
    if resume and overwrite:
        raise ConfigError("--resume continues a run and --overwrite starts it again: choose one")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file, not a run folder; choose another --out")
    found = [n for n in RUN_FILES if (out / n).exists()]
    if found and not (resume or overwrite):
        raise ConfigError(
            f"{out} already holds a run ({', '.join(found)}); use --resume to continue it, "
            "--overwrite to replace it, or another --out"
        )


def check_resumed_data(saved: CheckpointMeta, data, task: str, where: Path) -> None:
    """A resumed run trains on its saved split; data given again must be the data it was made from.

    Raises:
        ConfigError: ``data`` differs from the run's (listing the images added and left out).
    """
    if not data:
        return
    asked = exclude_sources(load_dataset(data, task), saved.config.get("data", {}).get("exclude", ""))
    if asked.fingerprint() == saved.data_fingerprint:
        return
    saved_split = read_split(where / "split.csv", task)
    old = {r.path.name for r in saved_split.index.records}
    new = {r.path.name for r in asked.records}
    added, missing = sorted(new - old), sorted(old - new)
    raise ConfigError(
        f"{where}: --resume with other data than the run was made from ({len(added)} image(s) added, e.g. "
        f"{added[:3]}; {len(missing)} left out, e.g. {missing[:3]}); resume without --data, or start a new run"
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

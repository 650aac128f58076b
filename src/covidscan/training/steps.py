"""One epoch and one validation: the optimizer, the step (mixup, class weights), precise BatchNorm."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from covidscan.config import Config
from covidscan.data.transforms import model_input
from covidscan.predict import batchnorm_statistics, predict_loader
from covidscan.training.data import TrainData

logger = logging.getLogger(__name__)


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
    progress: EpochProgress | None = None, on_step=None, mixup: float = 0.0, adversary=None,
) -> dict:  # fmt: skip
    """One pass over ``loader``; returns ``{"train_loss", "train_acc", "seen"}`` (means over images).

    ``mixup`` > 0: each batch is blended with a shuffled copy of itself, ``lam * x + (1 - lam) * x[perm]``
    with ``lam ~ Beta(mixup, mixup)`` drawn from the global generator (seeded per epoch), and the loss is
    the same blend of the two labels' cross-entropies; accuracy is counted against the unshuffled labels.

    ``progress``: continue an epoch resumed after ``progress.step`` steps (``loader`` then yields the
    remaining batches only); ``on_step(progress)`` is called after every optimizer step.

    ``adversary``: a :class:`~covidscan.training.adversary.SourceAdversary` attached to ``net``; its loss
    (through a reversed gradient) is added to each step's, and it takes its own optimizer step. The reported
    ``train_loss`` stays the classification loss.
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
        if adversary is not None:
            adversary.zero_grad()
            (loss + adversary.loss(batch["index"], y)).backward()
        else:
            loss.backward()
        optimizer.step()
        if adversary is not None:
            adversary.step()
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

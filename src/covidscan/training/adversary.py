"""A source adversary (conditional domain-adversarial training): features that do not tell the sources apart.

Ganin et al. 2016 ("Domain-adversarial training of neural networks", DANN) add a small network that guesses
each training image's domain from the model's features and pass its gradient back to the backbone
reversed, so the backbone learns features the guess fails on. When class and source are confounded (every
COVID slice of one hospital, every non-COVID of another) plain DANN would also erase the class. Li et al.
2018 ("Deep domain generalization via conditional invariant adversarial networks", CDANN; DomainBed's
CDANN) condition the guess on the label: here one output layer per class, and only among the sources
that have training images of that class. The backbone is pushed to make *which hospital, given the
class* unguessable, which is the source cue a new hospital breaks, and keeps what separates the classes.

Only active inside :class:`SourceAdversary`'s :meth:`~SourceAdversary.attached` block, which the training loop
wraps around the optimisation steps. The adversary has its own parameters and optimizer and is never part of
the model: validation, precise BatchNorm, checkpoints and inference see the plain model. The strength is ramped
from 0 with DANN's schedule ``2 / (1 + exp(-10 p)) - 1`` over the run's optimisation steps (``p`` in [0, 1]),
so the classifier learns first. A run resumed from a step checkpoint starts a fresh adversary.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

HIDDEN = 256  # the adversary's hidden width (DomainBed's CDANN: an MLP of this order on the features)


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.scale * grad, None


def reverse_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward; the gradient multiplied by ``-scale`` backward."""
    return _Reverse.apply(x, scale)


def dann_ramp(progress: float) -> float:
    """DANN's schedule: 0 at the start of training, about 0.99 half-way, 1 at the end."""
    return 2.0 / (1.0 + math.exp(-10.0 * min(max(progress, 0.0), 1.0))) - 1.0


class SourceAdversary(nn.Module):
    """Guesses the source of each image from its pre-logit features, one output layer per class.

    ``allowed`` (``classes x sources``, bool): which sources have training images of each class; the others
    are masked out of that class's guess (a class seen from one source only gives the adversary nothing).
    ``rows_to_source``: the source id of every image-store row a batch's ``index`` may name (-1 = none).
    """

    def __init__(self, in_features: int, allowed: torch.Tensor, rows_to_source: torch.Tensor, *, weight: float,
                 total_steps: int, lr: float = 1e-3, source_names: Sequence[str] = ()) -> None:  # fmt: skip
        super().__init__()
        self.num_classes, self.num_sources = allowed.shape
        self.source_names = list(source_names)  # source id -> name (for reading the guesses)
        self.net = nn.Sequential(
            nn.Linear(in_features, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, self.num_classes * self.num_sources)
        )
        self.register_buffer("allowed", allowed.bool())
        self.register_buffer("rows_to_source", rows_to_source.long())
        self.weight, self.total_steps, self.steps = weight, max(total_steps, 1), 0
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr)
        self._features: torch.Tensor | None = None
        self._sums = [0, 0.0, 0]  # images, loss sum, correct guesses since attached()

    @classmethod
    def for_training(cls, model: nn.Module, rows: Sequence[int], labels: Sequence[int], sources: Sequence[str],
                     num_rows: int, *, weight: float, total_steps: int) -> SourceAdversary:  # fmt: skip
        """An adversary over the sources of the training images (store ``rows``, their ``labels`` and ``sources``)."""
        names = sorted(set(sources))
        sid = {s: k for k, s in enumerate(names)}
        num_classes = model.head.fc.out_features
        allowed = torch.zeros(num_classes, len(names), dtype=torch.bool)
        rows_to_source = torch.full((num_rows,), -1, dtype=torch.long)
        for r, y, s in zip(rows, labels, sources):
            allowed[int(y), sid[s]] = True
            rows_to_source[int(r)] = sid[s]
        return cls(model.head.fc.in_features, allowed, rows_to_source, weight=weight, total_steps=total_steps,
                   source_names=names)  # fmt: skip

    def scale(self) -> float:
        """The reversed gradient's multiplier at this step: ``weight`` times the DANN ramp."""
        return self.weight * dann_ramp(self.steps / self.total_steps)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Source logits of each image under its own class (``N x sources``; impossible sources at -inf)."""
        logits = self.net(features.float()).view(-1, self.num_classes, self.num_sources)
        logits = logits[torch.arange(len(labels), device=labels.device), labels]
        return logits.masked_fill(~self.allowed[labels], float("-inf"))

    @contextmanager
    def attached(self, model: nn.Module) -> Iterator[SourceAdversary]:
        """Within the block, every forward pass of ``model`` keeps the input of ``model.head.fc`` (the
        pre-logit features) for :meth:`loss`; the hook is removed on exit, errors included."""

        def keep(module, inputs):
            self._features = inputs[0]

        handle = model.head.fc.register_forward_pre_hook(keep)
        self.to(next(model.parameters()).device)
        self.train()
        self._sums = [0, 0.0, 0]
        try:
            yield self
        finally:
            handle.remove()
            self._features = None

    def loss(self, index: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The adversary's cross-entropy on the last forward pass's features, through a reversed gradient.

        Images of a class that only one source supplies carry no signal (their one allowed logit) and are
        left out. Backpropagating it trains the adversary to guess and the backbone to defeat the guess."""
        if self._features is None:
            raise RuntimeError("SourceAdversary.loss needs a forward pass inside attached()")
        src = self.rows_to_source[index.to(self.rows_to_source.device)].to(labels.device)
        informative = (src >= 0) & (self.allowed[labels].sum(1) > 1)
        if not bool(informative.any()):
            return self._features.new_zeros(())
        feats = reverse_gradient(self._features[informative], self.scale())
        logits = self(feats, labels[informative])
        loss = F.cross_entropy(logits, src[informative])
        n = int(informative.sum())
        self._sums[0] += n
        self._sums[1] += float(loss.detach()) * n
        self._sums[2] += int((logits.argmax(1) == src[informative]).sum())
        return loss

    def metrics(self) -> dict:
        """Since :meth:`attached`: the adversary's mean loss and source accuracy (chance is about one over the
        sources per class), and the current gradient scale."""
        n, loss, correct = self._sums
        return {"adv_loss": loss / n if n else float("nan"), "adv_acc": correct / n if n else float("nan"),
                "adv_scale": self.scale()}  # fmt: skip

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: D102 (nn.Module's, and the optimizer's)
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        """The adversary's own optimizer step, after the model's backward pass; advances the ramp."""
        self.optimizer.step()
        self.steps += 1

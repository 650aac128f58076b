"""The ensemble as a module: several classifiers whose softmax probabilities are averaged.

Checkpoints of ensembles, and making them from trained members, are :mod:`covidscan.ensemble`'s; training
them is :mod:`covidscan.training.ensemble`'s. This module only builds the network.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from covidscan.models import build_model


class Ensemble(nn.Module):
    """Mean of the members' softmax probabilities, returned as log-probabilities (``N x classes``).

    ``sizes``: each member's input size; a member whose size differs from the input's gets the
    input resized to it (bilinear). ``None``: every member takes the input as it comes.
    """

    def __init__(self, members: list[nn.Module], sizes: list[int | None] | None = None):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        if sizes is not None and len(sizes) != len(members):
            raise ValueError(f"{len(sizes)} sizes for {len(members)} members")
        self.members = nn.ModuleList(members)
        self.sizes = list(sizes) if sizes is not None else [None] * len(members)
        self.spec = replace(members[0].spec, cam_layer="members.0.backbone")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([m(self._fit(x, s)).float().softmax(1) for m, s in zip(self.members, self.sizes)]).mean(0)
        return probs.clamp_min(1e-12).log()

    @staticmethod
    def _fit(x: torch.Tensor, size: int | None) -> torch.Tensor:
        if size is None or tuple(x.shape[-2:]) == (size, size):
            return x
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def build_ensemble(members: list[dict], num_classes: int, default_size: int) -> Ensemble:
    """An :class:`Ensemble` with random weights for the member records a checkpoint stores (``backbone``,
    ``head``, ``dropout``, ``image_size``; members recorded before mixed sizes existed take ``default_size``)."""
    nets = [build_model(m["backbone"], m["head"], num_classes, weights="none", dropout=m.get("dropout"))[0] for m in members]
    return Ensemble(nets, [m.get("image_size", default_size) for m in members])

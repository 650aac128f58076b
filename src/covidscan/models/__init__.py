"""Models: backbone registry, heads, and the assembled classifier."""

from __future__ import annotations

import torch
from torch import nn

from covidscan.models import backbones as _backbones  # noqa: F401  (registers the backbones)
from covidscan.models.heads import HEADS, build_head
from covidscan.models.registry import BackboneSpec, get_backbone, list_backbones, register_backbone
from covidscan.models.weights import WeightsUnavailableError, resolve_weights


class CovidNet(nn.Module):
    """Backbone feature extractor + head; returns logits ``N x classes`` in train and eval mode.

    Input: ``N x 3 x S x S`` normalised by the spec. Probabilities are ``softmax(logits)``.
    """

    def __init__(self, spec: BackboneSpec, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.spec = spec
        self.backbone = backbone
        self.head = head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)  # N x C x h x w

    def forward_head(self, feats: torch.Tensor, *, pre_logits: bool = False) -> torch.Tensor:
        return self.head.pre_logits(feats) if pre_logits else self.head(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build_model(
    backbone: str,
    head: str,
    num_classes: int,
    *,
    weights: str = "none",
    download: bool = True,
    dropout: float | None = None,
) -> tuple[CovidNet, str]:
    """Build a classifier; returns ``(model, weights_source)``. See :func:`resolve_weights`."""
    spec = get_backbone(backbone)
    state, source = resolve_weights(spec, weights, download=download)
    features, in_features = spec.builder(state)
    return CovidNet(spec, features, build_head(head, in_features, num_classes, dropout)), source


__all__ = [
    "HEADS",
    "BackboneSpec",
    "CovidNet",
    "WeightsUnavailableError",
    "build_model",
    "get_backbone",
    "list_backbones",
    "register_backbone",
    "resolve_weights",
]

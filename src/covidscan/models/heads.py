"""Classification heads, usable on any backbone feature map ``N x C x h x w``.

* ``linear``: the paper's baselines (Berrimi et al. 2021, DenseNet and InceptionV3): global
  average pooling and a new fully connected layer ``C -> classes``. Softmax is applied to
  the logits at prediction time (training uses cross-entropy on the logits).
* ``paper``: the paper's New-DenseNet head. The paper adds "an extra convolution layer" on
  the features and a head of "dense layer, dropout and BatchNormalization" without sizes;
  covidscan uses: Conv 3x3, C -> 512 (+ BatchNorm, ReLU) -> global average pooling ->
  Dense 512 -> 256 + ReLU -> Dropout(0.5) -> BatchNorm1d(256) -> Dense 256 -> classes.
"""

from __future__ import annotations

import torch
from torch import nn

PAPER_CONV_CHANNELS = 512
PAPER_DENSE_UNITS = 256
PAPER_DROPOUT = 0.5


class LinearHead(nn.Module):
    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_classes)

    def pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(torch.flatten(self.pool(x), 1))  # N x C

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pre_logits(x))


class PaperHead(nn.Module):
    """New-DenseNet's extra convolution + dense / dropout / BatchNorm head (sizes in the module docstring)."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = PAPER_DROPOUT):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_features, PAPER_CONV_CHANNELS, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(PAPER_CONV_CHANNELS),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dense = nn.Sequential(
            nn.Linear(PAPER_CONV_CHANNELS, PAPER_DENSE_UNITS),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.BatchNorm1d(PAPER_DENSE_UNITS),
        )
        self.fc = nn.Linear(PAPER_DENSE_UNITS, num_classes)

    def pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)  # N x 512 x h x w
        return self.dense(torch.flatten(self.pool(x), 1))  # N x 256

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pre_logits(x))


HEADS = {"linear": LinearHead, "paper": PaperHead}


def build_head(name: str, in_features: int, num_classes: int, dropout: float | None = None) -> nn.Module:
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; choose one of {sorted(HEADS)}")
    kwargs = {} if dropout is None else {"dropout": dropout}
    return HEADS[name](in_features, num_classes, **kwargs)

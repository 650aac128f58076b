"""Appearance reference: flags inputs unlike the training scans (a CT slice given to an X-ray model).

At training time :func:`appearance_reference` stores, in the checkpoint, the mean 16 x 16
thumbnail of the training images and the 1st percentile of their correlations with it. At
prediction time an input whose correlation falls below that percentile gets a warning
(``covidscan.inference``). A heuristic, not a guarantee.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

THUMB = 16  # side of the appearance thumbnails


def thumbnails(images: torch.Tensor) -> torch.Tensor:
    """``N x 1 x S x S`` uint8 -> ``N x THUMB*THUMB`` float, each row centred and scaled to unit norm."""
    t = F.adaptive_avg_pool2d(images.float(), THUMB).flatten(1)
    t = t - t.mean(1, keepdim=True)
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-6)


def appearance_reference(images: torch.Tensor) -> dict:
    """``{"thumb": mean thumbnail, "corr_p01": 1st percentile of correlations, "side": THUMB}``; {} when empty."""
    if len(images) == 0:
        return {}
    th = thumbnails(images)
    mean = th.mean(0)
    mean = mean / mean.norm().clamp_min(1e-6)
    corr = th @ mean
    return {"thumb": mean.tolist(), "corr_p01": float(torch.quantile(corr, 0.01)), "side": THUMB}


def appearance_correlation(image: torch.Tensor, reference: dict) -> float:
    """Correlation of one ``1 x S x S`` uint8 image with the reference's mean thumbnail."""
    return float(thumbnails(image[None])[0] @ torch.tensor(reference["thumb"]))

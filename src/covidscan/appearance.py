"""Appearance reference: flags inputs unlike the training scans (a CT slice given to an X-ray model).

Two checks, both on thumbnails of the model's input (``covidscan.inference`` warns when either fails):

* **mean appearance**: at training time :func:`appearance_reference` stores the mean 16 x 16 thumbnail
  of the training images and the 1st percentile of their correlations with it; an input below it fails.
* **nearest training scan**: the checkpoint's provenance record holds the 32 x 32 thumbnail of every
  training image (:mod:`covidscan.provenance`); an input whose closest training thumbnail correlates
  less than the closest one of all but :data:`NN_QUANTILE` of the validation images did (never a bar above
  :data:`NN_CAP`) fails. One mean
  cannot describe CT slices framed and windowed many ways (the mean check let 76% of chest X-rays
  through a CT model); the nearest neighbour can (9% through, 0% of the CT test slices flagged).

Heuristics, not a guarantee; the flag rates measured on ``../shared`` are in ``docs/results/ood.md``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from covidscan.provenance import thumbnails as fingerprint_thumbnails

THUMB = 16  # side of the appearance thumbnails
NN_QUANTILE = 0.005  # validation images whose nearest training scan is further than the threshold
NN_CAP = 0.9  # a scan this close to a training scan is never flagged (a tiny or uniform validation split sets no tighter bar)


def thumbnails(images: torch.Tensor) -> torch.Tensor:
    """``N x 1 x S x S`` uint8 -> ``N x THUMB*THUMB`` float, each row centred and scaled to unit norm."""
    t = F.adaptive_avg_pool2d(images.float(), THUMB).flatten(1)
    t = t - t.mean(1, keepdim=True)
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-6)


def appearance_reference(images: torch.Tensor, record: dict | None = None) -> dict:
    """``{"thumb": mean thumbnail, "corr_p01": 1st percentile of correlations, "side": THUMB}``; {} when empty.
    With the run's provenance ``record`` also ``"nn_threshold"``: the :data:`NN_QUANTILE` quantile of the
    validation images' nearest-training-scan correlations (see the module docstring)."""
    if len(images) == 0:
        return {}
    th = thumbnails(images)
    mean = th.mean(0)
    mean = mean / mean.norm().clamp_min(1e-6)
    corr = th @ mean
    ref = {"thumb": mean.tolist(), "corr_p01": float(torch.quantile(corr, 0.01)), "side": THUMB}
    if record is not None and bool((record["subset"] == 1).any()) and bool((record["subset"] == 0).any()):
        train, val = record["thumb"][record["subset"] == 0], record["thumb"][record["subset"] == 1]
        q = float(torch.quantile(nearest_correlation(val, unit_rows(train)), NN_QUANTILE))
        ref["nn_threshold"] = min(q, NN_CAP)
        ref["nn_quantile"] = NN_QUANTILE
    return ref


def unit_rows(thumbs: torch.Tensor) -> torch.Tensor:
    """int8 fingerprint thumbnails -> float rows of unit norm (for correlations by dot product)."""
    t = thumbs.float()
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-6)


def nearest_correlation(thumbs: torch.Tensor, train_unit: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Each row of ``thumbs`` (int8 fingerprint thumbnails): its correlation with the closest of ``train_unit``."""
    out = [(unit_rows(thumbs[k : k + chunk]) @ train_unit.T).max(1).values for k in range(0, len(thumbs), chunk)]
    return torch.cat(out) if out else torch.zeros(0)


def nearest_training_correlation(image: torch.Tensor, train_unit: torch.Tensor) -> float:
    """One ``1 x S x S`` uint8 image: correlation of its fingerprint thumbnail with the closest training scan's."""
    return float(nearest_correlation(fingerprint_thumbnails(image[None]), train_unit)[0])


def appearance_correlation(image: torch.Tensor, reference: dict) -> float:
    """Correlation of one ``1 x S x S`` uint8 image with the reference's mean thumbnail."""
    return float(thumbnails(image[None])[0] @ torch.tensor(reference["thumb"]))

"""Hounsfield units (CT) -> the 8-bit slice a CT model reads, and where the lungs are in a slice.

One window for every entry point: a DICOM slice scored alone, a slice of a study (DICOM series, NIfTI,
zip) and a slice exported for training are all mapped by :func:`window` with the checkpoint's lung
window (``study.window_center`` / ``window_width``, stored in ``Preprocess.hu_window``), never with the
window a file happens to carry.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: a slice whose lung area is below this fraction of its pixels holds no lung worth scoring
MIN_LUNG_PIXELS = 0.01
MASK_SIDE = 256  # lung masks are found on slices subsampled to at most this side (4x fewer pixels for 512 x 512)


def window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """Hounsfield units -> uint8 grey values through the window (``center``, ``width``)."""
    lo = center - width / 2.0
    return np.round(np.clip((np.asarray(hu, np.float32) - lo) / width, 0.0, 1.0) * 255.0).astype(np.uint8)


def lung_mask(hu_slice: np.ndarray) -> np.ndarray:
    """Air inside the body of one axial slice (boolean): lungs and airways. The body is what is above
    -500 HU with its holes filled; lung is below -400 HU inside it."""
    body = ndimage.binary_fill_holes(hu_slice > -500)
    lungs = body & (hu_slice < -400)
    return ndimage.binary_opening(lungs, iterations=2)


def subsample_factor(shape: tuple[int, ...]) -> int:
    """Step that brings a slice's longer side to at most :data:`MASK_SIDE`."""
    return max(1, int(np.ceil(max(shape[-2:]) / MASK_SIDE)))


def lung_fraction(hu_slice: np.ndarray) -> float:
    """Fraction of a slice's pixels that is lung (found on the slice subsampled as a study's are)."""
    f = subsample_factor(hu_slice.shape)
    return float(lung_mask(hu_slice[::f, ::f]).mean())

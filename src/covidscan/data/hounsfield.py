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
BODY_CROP_VERSION = 1  # bump when body_box / crop_to_body change: it keys the on-disk image cache
BODY_LEVEL = 0.5  # body = brighter than this fraction of the 1st..99th percentile range (body_box)
MIN_ENCLOSED = 0.1  # body_box: the body's holes (lungs, airways) must add this fraction to its tissue
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


def body_box(g: np.ndarray, *, pad: float = 0.03) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` of the body on an axial CT slice given as grey values in [0, 1] (any
    window, HU-derived or an 8-bit picture from a paper): the largest bright region once its holes (the
    lungs) are filled, after an opening that cuts the scanner table and text away from it. The whole image
    when the body fills it already (slices published cropped: their lungs reach the edge) or nothing
    body-like is found, so the crop never cuts into the chest.
    """
    h, w = g.shape
    f = subsample_factor(g.shape)
    s = ndimage.gaussian_filter(np.asarray(g[::f, ::f], np.float32), 1.0)
    lo, hi = np.percentile(s, [1, 99])
    if hi - lo < 1e-3:
        return 0, h, 0, w
    # soft tissue is near white in every lung window; the air (and a reconstruction circle) around the patient
    # is dark or mid grey; an opening cuts the table, text and frame lines that touch the body
    fg = s > lo + BODY_LEVEL * (hi - lo)
    fg = ndimage.binary_opening(fg, structure=np.ones((3, 3), bool), iterations=3)
    labels, n = ndimage.label(fg)
    if n == 0:
        return 0, h, 0, w
    areas = ndimage.sum(fg, labels, index=range(1, n + 1))
    tissue = labels == 1 + int(np.argmax(areas))
    body = ndimage.binary_fill_holes(tissue)
    # a body encloses its lungs (filling its holes adds them); a slice published cropped has its lungs open
    # to the image edge, and its largest bright region is the mediastinum: leave such a slice alone
    if body.mean() < 0.15 or body.sum() < (1 + MIN_ENCLOSED) * tissue.sum():
        return 0, h, 0, w
    ys, xs = np.nonzero(body)
    py, px = pad * h, pad * w
    top, bottom = max(0, int(ys.min() * f - py)), min(h, int((ys.max() + 1) * f + py))
    left, right = max(0, int(xs.min() * f - px)), min(w, int((xs.max() + 1) * f + px))
    return top, bottom, left, right


def crop_to_body(g: np.ndarray) -> np.ndarray:
    """The slice cut to :func:`body_box` (the ``data.body_crop`` option): one framing for slices shown with
    the air, table and annotations around the patient and for slices published already cropped."""
    top, bottom, left, right = body_box(g)
    return g[top:bottom, left:right]


def subsample_factor(shape: tuple[int, ...]) -> int:
    """Step that brings a slice's longer side to at most :data:`MASK_SIDE`."""
    return max(1, int(np.ceil(max(shape[-2:]) / MASK_SIDE)))


def lung_fraction(hu_slice: np.ndarray) -> float:
    """Fraction of a slice's pixels that is lung (found on the slice subsampled as a study's are)."""
    f = subsample_factor(hu_slice.shape)
    return float(lung_mask(hu_slice[::f, ::f]).mean())

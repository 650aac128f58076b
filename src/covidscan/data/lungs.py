"""Lung-field box by plain image processing (no segmenter: we have no lung masks to train one).

A chest film shows the lungs as the two large dark regions inside the brighter body
(mediastinum, ribs, diaphragm, soft tissue). :func:`lung_box` finds them on a small copy:

1. resize to ``WORK x WORK``, stretch the 2nd..98th percentile to [0, 1], smooth (Gaussian);
2. for five thresholds around the Otsu level of the image's central part: mark the darker
   pixels, open (cut thin bridges, e.g. lung to outside air through the armpit), label regions,
   and keep those shaped like a lung field (area, height, width, centre in the central band,
   not running down the left or right image edge, which is air beside the patient);
3. take the largest such region on each side; keep the threshold whose pair covers most;
4. the box around that pair, padded, mirrored about the midline when only one lung was
   found, and widened to a minimum size.

When nothing plausible is found the whole image is returned, so the crop can only
remove borders, text and markers, never the chest. Deterministic: no randomness.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

WORK = 128  # side of the working copy


def _otsu(values: np.ndarray) -> float:
    hist, edges = np.histogram(values, bins=64, range=(0.0, 1.0))
    p = hist.astype(np.float64) / max(1, hist.sum())
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    mu = np.cumsum(p * centers)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * w0 - mu) ** 2 / (w0 * (1 - w0))
    between = np.nan_to_num(between)
    return float(centers[int(np.argmax(between))])


def _small(g: np.ndarray) -> np.ndarray:
    h, w = g.shape
    zy, zx = WORK / h, WORK / w
    s = ndimage.zoom(g.astype(np.float32), (zy, zx), order=1, prefilter=False)
    return s[:WORK, :WORK]


def _candidates(s: np.ndarray, thr: float) -> list[tuple[int, tuple[slice, slice], float]]:
    """Dark regions below ``thr`` shaped like a lung field: ``(area, bbox, centre x)``."""
    n = s.shape[0]
    dark = ndimage.binary_opening(s < thr, structure=np.ones((5, 5), bool))
    labels, _ = ndimage.label(dark)
    out = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        region = labels[sl] == i
        area = int(region.sum())
        height, width = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
        if area < 0.02 * n * n or width > 0.55 * n or not 0.3 * n <= height <= 0.92 * n:
            continue
        ys, xs = np.nonzero(region)
        cy, cx = (ys.mean() + sl[0].start) / n, (xs.mean() + sl[1].start) / n
        if not (0.12 < cx < 0.88 and 0.2 < cy < 0.8):
            continue
        for col, at_edge in ((0, sl[1].start == 0), (n - 1, sl[1].stop == n)):
            if at_edge and (labels[sl[0], col] == i).sum() > 0.5 * height:
                break  # runs down the image edge: air beside the patient, not a lung
        else:
            out.append((area, sl, cx))
    return out


def lung_box(g: np.ndarray, *, pad: float = 0.05, min_side: float = 0.5) -> tuple[int, int, int, int]:
    """``H x W`` gray image in [0, 1] -> ``(y0, y1, x0, x1)`` box around the lung fields.

    Tries thresholds from the Otsu level downwards and keeps the one whose best left and
    right lung-shaped regions cover the most area; one lung found -> the box is mirrored
    about the image's vertical midline (films are centred on the spine).
    """
    h, w = g.shape
    full = (0, h, 0, w)
    if h < 32 or w < 32:
        return full
    s = _small(g)
    n = s.shape[0]
    lo, hi = np.percentile(s, [2, 98])
    if hi - lo < 1e-3:
        return full
    s = ndimage.gaussian_filter(np.clip((s - lo) / (hi - lo), 0, 1), 1.5)
    otsu = _otsu(s[n // 8 : n - n // 8, n // 8 : n - n // 8].ravel())
    best, best_area = [], 0
    for thr in (otsu + 0.05, otsu, otsu - 0.05, otsu - 0.1, otsu - 0.15):
        cands = sorted(_candidates(s, thr), key=lambda k: -k[0])
        pair = [k for k in cands if k[2] < 0.5][:1] + [k for k in cands if k[2] >= 0.5][:1]
        area = sum(k[0] for k in pair) * (1.5 if len(pair) == 2 else 1.0)
        if area > best_area:
            best, best_area = pair, area
    if not best:
        return full
    y0 = min(k[1][0].start for k in best) / n - pad
    y1 = max(k[1][0].stop for k in best) / n + pad
    x0 = min(k[1][1].start for k in best) / n - pad
    x1 = max(k[1][1].stop for k in best) / n + pad
    if len(best) == 1:
        x0, x1 = min(x0, 1 - x1), max(x1, 1 - x0)
    box = [y0, y1, x0, x1]
    for a, b in ((0, 1), (2, 3)):
        if box[b] - box[a] < min_side:
            mid = (box[a] + box[b]) / 2
            box[a], box[b] = mid - min_side / 2, mid + min_side / 2
    y0, y1, x0, x1 = max(0.0, box[0]), min(1.0, box[1]), max(0.0, box[2]), min(1.0, box[3])
    return int(round(y0 * h)), int(round(y1 * h)), int(round(x0 * w)), int(round(x1 * w))


def crop_to_lungs(g: np.ndarray) -> np.ndarray:
    y0, y1, x0, x1 = lung_box(g)
    return g[y0:y1, x0:x1]

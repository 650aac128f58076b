"""Where the lungs are on a chest film: a box by plain image processing, and the learned segmenter.

**Learned lung segmentation** (:func:`segment_lungs`, :func:`apply_lungs`; the ``data.lungs`` option): a small
U-Net (Ronneberger et al. 2015) with shipped weights (``covidscan/weights/lungseg_unet128.pt``), trained on the
262 OpenIST films of ``../shared/data/xray-lungs`` by :mod:`covidscan.training.lungseg`. It takes any gray image
in [0, 1] and returns a boolean lung mask of the same size (the two largest connected regions, holes filled);
:func:`lung_bbox` turns it into the box of ``lungs=crop``.

**Lung-field box and mask by plain image processing** (:func:`frame_lungs`; the ``data.lung_crop`` and
``data.lung_mask`` options):

A chest film shows the lungs as the two large dark regions inside the brighter body
(mediastinum, ribs, diaphragm, soft tissue). :func:`lung_box` finds them on a small copy:

1. resize to ``WORK x WORK``, stretch the 2nd..98th percentile to [0, 1], smooth (Gaussian);
2. for five thresholds around the Otsu level of the image's central part: mark the darker
   pixels, open (cut thin bridges, e.g. lung to outside air through the armpit), label regions,
   and keep those shaped like a lung field (area, height, width, centre in the central band,
   not running down the left or right image edge, which is air beside the patient);
3. take the largest such region on each side; keep the threshold whose pair covers most;
4. the box around that pair, padded, mirrored about the midline when only one lung was
   found, and widened to a minimum size;
5. for ``lung_mask`` (:func:`lung_field_mask`; lungs joined into one region are cut apart first): the
   outline of each lung closed (a disk of about 5% of the side) and its holes filled, so that dense lesions
   inside or at the edge of a lung stay in without bridging the liver dome or the heart, grown by a few
   pixels; the rest is set to black. When only one lung passes the shape test, the other is the dark
   regions inside its mirror image (a crescent at the lung base), the mirror image only when there are none.

When nothing plausible is found the whole image is returned, so the crop can only
remove borders, text and markers, never the chest. Deterministic: no randomness.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from covidscan.errors import CheckpointError

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


def _split_merged(dark: np.ndarray) -> np.ndarray:
    """Cut each region wider than one lung and centred on the midline at its narrowest column of the central
    band: both lungs joined across a thin anterior junction (or smoothed together on a wide slice)."""
    n = dark.shape[0]
    labels, _ = ndimage.label(dark)
    out = dark.copy()
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None or sl[1].stop - sl[1].start <= 0.55 * n:
            continue
        region = labels == i
        counts = region.sum(axis=0)
        a, b = int(0.35 * n), int(0.65 * n)
        cx = (counts * np.arange(n)).sum() / max(1, counts.sum()) / n
        if not 0.35 < cx < 0.65 or counts[a:b].min() > 0.5 * (sl[0].stop - sl[0].start):
            continue  # not centred, or no narrow waist to cut (one dark mass, not two lungs)
        col = a + int(np.argmin(counts[a:b]))
        out[:, max(0, col - 1) : col + 2] &= ~region[:, max(0, col - 1) : col + 2]
    return out


def _dark(s: np.ndarray, thr: float, split: bool = False) -> np.ndarray:
    dark = ndimage.binary_opening(s < thr, structure=np.ones((5, 5), bool))
    return _split_merged(dark) if split else dark


def _candidates(s: np.ndarray, thr: float, split: bool = False) -> list[tuple[int, tuple[slice, slice], float]]:
    """Dark regions below ``thr`` shaped like a lung field: ``(area, bbox, centre x)``."""
    n = s.shape[0]
    labels, _ = ndimage.label(_dark(s, thr, split))
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


Region = tuple[int, tuple[slice, slice], float]  # area, bounding box, centre x (fraction of the side)


def _lung_pair(g: np.ndarray, split: bool = False) -> tuple[np.ndarray, float, list[Region]] | None:
    """The working copy, the chosen threshold and the left and right lung-shaped regions (steps 1-3 above);
    ``None`` when the image is too small or flat, or nothing lung-shaped is found. ``split``: lungs joined
    into one region are cut apart first (:func:`_split_merged`; the mask's search, not the box's, whose
    results the ``lung_crop`` checkpoints depend on)."""
    h, w = g.shape
    if h < 32 or w < 32:
        return None
    s = _small(g)
    n = s.shape[0]
    lo, hi = np.percentile(s, [2, 98])
    if hi - lo < 1e-3:
        return None
    s = ndimage.gaussian_filter(np.clip((s - lo) / (hi - lo), 0, 1), 1.5)
    otsu = _otsu(s[n // 8 : n - n // 8, n // 8 : n - n // 8].ravel())
    best, best_area, best_thr = [], 0, otsu
    for thr in (otsu + 0.05, otsu, otsu - 0.05, otsu - 0.1, otsu - 0.15):
        cands = sorted(_candidates(s, thr, split), key=lambda k: -k[0])
        pair = [k for k in cands if k[2] < 0.5][:1] + [k for k in cands if k[2] >= 0.5][:1]
        area = sum(k[0] for k in pair) * (1.5 if len(pair) == 2 else 1.0)
        if area > best_area:
            best, best_area, best_thr = pair, area, thr
    return (s, best_thr, best) if best else None


def lung_box(g: np.ndarray, *, pad: float = 0.05, min_side: float = 0.5) -> tuple[int, int, int, int]:
    """``H x W`` gray image in [0, 1] -> ``(y0, y1, x0, x1)`` box around the lung fields.

    Tries thresholds from the Otsu level downwards and keeps the one whose best left and
    right lung-shaped regions cover the most area; one lung found -> the box is mirrored
    about the image's vertical midline (films are centred on the spine).
    """
    h, w = g.shape
    found = _lung_pair(g)
    if found is None:
        return (0, h, 0, w)
    s, _, best = found
    n = s.shape[0]
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


MASK_VERSION = 2  # of lung_field_mask; part of the preprocessing cache key, bump when it changes
MASK_GROW = 2  # lung_field_mask: pixels of the working copy added around each lung's outline (pleura)


MASK_CLOSE = 6  # lung_field_mask: radius (pixels of the working copy) of the closing that takes lesions back in


def _disk(r: int) -> np.ndarray:
    y, x = np.ogrid[-r : r + 1, -r : r + 1]
    return x * x + y * y <= r * r


def _fill(region: np.ndarray) -> np.ndarray:
    """A lung's outline with the dense lesions that a threshold cuts out of it taken back in: a morphological
    closing (a disk of radius :data:`MASK_CLOSE`, about 5% of the side) then holes filled. Unlike a convex hull
    it does not bridge the wide concavities of a lung base (the liver dome, the heart), which a hull filled
    with bright tissue that looks like consolidation; the price is that a consolidation wider than the disk
    against the chest wall is cut back."""
    r = MASK_CLOSE
    padded = np.pad(region, r + 1)
    closed = ndimage.binary_closing(padded, structure=_disk(r))[r + 1 : -r - 1, r + 1 : -r - 1]
    return ndimage.binary_fill_holes(closed | region)


OTHER_LUNG_MIN = 0.2  # _other_lung: dark area found on the other side, as a share of the found lung, to use it


def _other_lung(labels: np.ndarray, found: np.ndarray) -> np.ndarray:
    """The other lung when the search found one (``found``: its filled outline): the dark regions lying mostly
    inside the mirror image of the found lung, each filled (:func:`_fill`), when they add up to at least
    :data:`OTHER_LUNG_MIN` of it (a lung too thin or short for the search's shape test: a crescent at the lung
    base around the liver dome or the heart); otherwise the mirror image itself (a lung white with
    consolidation, or absent)."""
    mirror = found[:, ::-1]
    out = np.zeros_like(found)
    for i in np.unique(labels[mirror & ~found]):
        region = labels == i
        if i and (region & mirror).sum() > 0.5 * region.sum():
            out |= _fill(region)
    return out & ~found if out.sum() >= OTHER_LUNG_MIN * found.sum() else mirror


def lung_field_mask(g: np.ndarray) -> np.ndarray:
    """``H x W`` boolean mask of the lung fields found by :func:`lung_box`'s search (the ``data.lung_mask``
    option): each of the two lung-shaped dark regions closed and filled (:func:`_fill`), so that dense lesions
    inside or at the edge of a lung (consolidation, nodules) stay in, grown by a few pixels; one lung found -> the dark
    regions inside its mirror image (:func:`_other_lung`), or the mirror image itself when there are none (the
    other lung may be white with consolidation). All ``True`` when nothing lung-shaped is found.
    """
    h, w = g.shape
    found = _lung_pair(g, split=True)
    if found is None:
        return np.ones((h, w), bool)
    s, thr, best = found
    labels, _ = ndimage.label(_dark(s, thr, split=True))
    m = np.zeros(s.shape, bool)
    for _, sl, _ in best:
        inside = labels[sl][labels[sl] > 0]
        m |= _fill(labels == np.bincount(inside).argmax())  # the region _candidates measured in this box
    if len(best) == 1:
        m |= _other_lung(labels, m)
    m = ndimage.binary_dilation(m, iterations=MASK_GROW)
    ys = np.minimum((np.arange(h) * s.shape[0]) // h, s.shape[0] - 1)
    xs = np.minimum((np.arange(w) * s.shape[1]) // w, s.shape[1] - 1)
    return m[np.ix_(ys, xs)]


def frame_lungs(g: np.ndarray, *, crop: bool = True, mask: bool = False) -> np.ndarray:
    """The ``data.lung_crop`` / ``data.lung_mask`` options: outside the lung fields set to black (``mask``),
    then the image cut to the box around them (``crop``: :func:`lung_box`, or with ``mask`` the mask's own box)."""
    if not mask:
        if not crop:
            return g
        y0, y1, x0, x1 = lung_box(g)
        return g[y0:y1, x0:x1]
    m = lung_field_mask(g)
    out = np.where(m, g, np.float32(0.0)).astype(np.float32)
    if crop and not m.all():
        y0, y1, x0, x1 = lung_bbox(m)
        out = out[y0:y1, x0:x1]
    return out


SIZE = 128  # the network's input side


SHIPPED = "lungseg_unet128.pt"  # inside the package: covidscan/weights/


VERSION = 1  # of the shipped weights; part of the preprocessing cache key, bump when they are retrained


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class LungUNet(nn.Module):
    """U-Net: ``N x 1 x S x S`` gray in [0, 1] -> ``N x 1 x S x S`` lung logits (S divisible by 16)."""

    def __init__(self, width: int = 16):
        super().__init__()
        w = [width, width * 2, width * 4, width * 8, width * 16]
        self.down = nn.ModuleList([_block(1, w[0]), _block(w[0], w[1]), _block(w[1], w[2]), _block(w[2], w[3])])
        self.bottom = _block(w[3], w[4])
        self.up = nn.ModuleList([nn.ConvTranspose2d(w[i + 1], w[i], 2, stride=2) for i in reversed(range(4))])
        self.dec = nn.ModuleList([_block(w[i] * 2, w[i]) for i in reversed(range(4))])
        self.out = nn.Conv2d(w[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - 0.5) / 0.25
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottom(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips)):
            x = dec(torch.cat([up(x), skip], 1))
        return self.out(x)


def _resize(a: np.ndarray, size: int) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def clean_mask(mask: np.ndarray) -> np.ndarray:
    """Keep the two largest connected regions (the lungs), holes filled."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask.astype(bool)
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    keep = np.argsort(sizes)[::-1][:2] + 1
    return ndimage.binary_fill_holes(np.isin(labels, keep))


def load_segmenter(path: str | Path | None = None) -> tuple[LungUNet, dict]:
    """The shipped segmenter (``path`` None) or one written by :func:`save_segmenter`."""
    src = Path(path) if path else Path(str(files("covidscan").joinpath("weights", SHIPPED)))
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
        model = LungUNet(int(obj["width"]))
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in obj["state_dict"].items()})
    except (OSError, RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{src}: not a usable lung segmenter ({type(exc).__name__}: {str(exc)[:160]})") from exc
    return model.eval(), obj.get("info", {})


@lru_cache(maxsize=1)
def _shipped() -> LungUNet:
    return load_segmenter()[0]


@torch.no_grad()
def segment_lungs(gray: np.ndarray, model: LungUNet | None = None) -> np.ndarray:
    """``H x W`` gray image in [0, 1] -> ``H x W`` boolean lung mask (the shipped network by default)."""
    model = model or _shipped()
    h, w = gray.shape
    x = _resize(gray, SIZE)[None]
    prob = torch.sigmoid(model(x))
    up = F.interpolate(prob, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
    small = clean_mask((prob[0, 0] > 0.5).numpy())
    if not small.any():
        return np.zeros((h, w), bool)
    keep = F.interpolate(torch.from_numpy(small.astype(np.float32))[None, None], size=(h, w), mode="nearest")[0, 0].numpy() > 0
    return (up > 0.5) & keep


def lung_bbox(mask: np.ndarray, pad: float = 0.05) -> tuple[int, int, int, int] | None:
    """``(y0, y1, x0, x1)`` around the mask, padded by ``pad`` of the image side; None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    h, w = mask.shape
    py, px = int(round(pad * h)), int(round(pad * w))
    return max(0, ys.min() - py), min(h, ys.max() + 1 + py), max(0, xs.min() - px), min(w, xs.max() + 1 + px)


def apply_lungs(gray: np.ndarray, how: str, model: LungUNet | None = None) -> np.ndarray:
    """Preprocessing with the learned mask: ``crop`` to the lung box, ``mask`` (outside the lungs set
    to the image's median grey), or ``both``; ``none`` returns ``gray``. No lungs found -> unchanged."""
    if how == "none":
        return gray
    mask = segment_lungs(gray, model)
    box = lung_bbox(mask)
    if box is None or mask.mean() < 0.02:
        return gray
    out = gray
    if how in ("mask", "both"):
        grown = ndimage.binary_dilation(mask, iterations=max(1, int(0.02 * max(gray.shape))))
        out = np.where(grown, gray, np.float32(np.median(gray))).astype(np.float32)
    if how in ("crop", "both"):
        y0, y1, x0, x1 = box
        out = out[y0:y1, x0:x1]
    return out

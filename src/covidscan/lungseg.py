"""Learned lung segmentation of chest X-rays: a small U-Net, its training, and the shipped weights.

Why a small U-Net from scratch (Ronneberger et al. 2015): no segmentation weights install
offline here (torchvision's LR-ASPP / DeepLab weights download at run time), lung fields are
large, smooth, high-contrast shapes that a 0.5 M-parameter network learns from a few hundred
masks, and at 128 x 128 it runs in milliseconds on a CPU.

Trained on ``../shared/data/xray-lungs`` (262 OpenIST adult normal PA films with hand-drawn
masks). Those films are tightly cropped teaching images, so training zooms *out* as well as in
(the film placed on a smaller canvas with a dark or grey surround) to teach the network that
shoulders, neck and abdomen are not lung: the check by eye on every shipped source is
``docs/results/lungs.png``.

:func:`segment_lungs` takes any gray image in [0, 1] and returns a boolean lung mask of the
same size (the two largest connected regions, holes filled). :func:`lung_bbox` turns it into
the box used by the ``lungs=crop`` preprocessing option.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from covidscan.data import load_dataset, read_image
from covidscan.errors import CheckpointError, DataError

logger = logging.getLogger(__name__)

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


def dice(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-image Dice of boolean (or [0, 1]) masks ``N x ... ``: 2|A∩B| / (|A| + |B|)."""
    p, t = pred.float().flatten(1), target.float().flatten(1)
    return (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)


# --- data --------------------------------------------------------------------------------------


def load_pairs(data: str | Path, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Images and masks of a manifest with a ``mask`` column (``xray-lungs``): ``N x 1 x S x S`` float, bool."""
    index = load_dataset(data, "xray")
    imgs, masks, names = [], [], []
    for rec in index.records:
        rel = rec.row.get("mask")
        if not rel:
            raise DataError(f"{rec.path}: the manifest has no 'mask' for this image (need a mask column)")
        img = read_image(rec.path).pixels
        img = img if img.ndim == 2 else img.mean(2)
        root = rec.path.parents[len(Path(rec.row["file"]).parts) - 1]  # the manifest's folder
        mask = read_image(root / rel).pixels > 0
        if mask.shape != img.shape:
            raise DataError(f"{rel}: mask size {mask.shape} differs from its image {img.shape}")
        imgs.append(_resize(img, size))
        masks.append(_resize(mask.astype(np.float32), size) > 0.5)
        names.append(rec.path.name)
    return torch.stack(imgs), torch.stack(masks), names


def _resize(a: np.ndarray, size: int) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def augment_pair(img: torch.Tensor, mask: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random zoom in *and out* (a smaller film on a dark or grey canvas), rotation, shift, flip and
    intensity changes; ``img`` ``N x 1 x S x S`` float, ``mask`` bool of the same shape."""
    n = img.shape[0]
    r = lambda *s: torch.rand(*s, generator=gen)  # noqa: E731
    scale = 0.55 + 0.6 * r(n)  # < 1 zooms out: the film shrinks inside the canvas
    angle = (r(n) - 0.5) * 0.35  # about +-10 degrees
    shift = (r(n, 2) - 0.5) * 0.3
    flip = torch.where(r(n) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(img.shape), align_corners=False)
    fill = (r(n) < 0.5).float() * (0.2 + 0.5 * r(n))  # canvas: black, or a grey like collimation / soft tissue
    ones = torch.ones_like(img)
    inside = F.grid_sample(ones, grid, align_corners=False, padding_mode="zeros")
    out = F.grid_sample(img, grid, align_corners=False, padding_mode="zeros") + (1 - inside) * fill.view(n, 1, 1, 1)
    m = F.grid_sample(mask.float(), grid, align_corners=False, padding_mode="zeros") > 0.5
    gamma = torch.exp((r(n) - 0.5) * 0.8).view(n, 1, 1, 1)
    contrast = (0.7 + 0.6 * r(n)).view(n, 1, 1, 1)
    out = ((out.clamp(0, 1) ** gamma - 0.5) * contrast + 0.5 + (r(n).view(n, 1, 1, 1) - 0.5) * 0.2).clamp(0, 1)
    return out, m


# --- training ----------------------------------------------------------------------------------


@dataclass
class SegResult:
    model: LungUNet
    dice_val: float
    dice_per_image: list[float]
    val_names: list[str]
    seconds: float
    epochs: int


def train_segmenter(
    images: torch.Tensor,
    masks: torch.Tensor,
    *,
    val_fraction: float = 0.2,
    epochs: int = 40,
    batch_size: int = 16,
    lr: float = 2e-3,
    width: int = 16,
    seed: int = 0,
    names: list[str] | None = None,
    progress: bool = False,
) -> SegResult:
    """Train :class:`LungUNet` (Adam, BCE + Dice loss, one-cycle learning rate) on a seeded split;
    report Dice on the held-out images (never seen in training, no augmentation)."""
    gen = torch.Generator().manual_seed(seed)
    n = len(images)
    order = torch.randperm(n, generator=gen)
    n_val = max(1, int(round(n * val_fraction))) if n > 1 else 0
    val, tr = order[:n_val], order[n_val:]
    torch.manual_seed(seed)
    model = LungUNet(width)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * max(1, -(-len(tr) // batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = tr[torch.randperm(len(tr), generator=gen)]
        for k in range(0, len(perm), batch_size):
            b = perm[k : k + batch_size]
            x, y = augment_pair(images[b], masks[b], gen)
            logits = model(x)
            loss = F.binary_cross_entropy_with_logits(logits, y.float()) + (1 - dice(torch.sigmoid(logits), y)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if progress:
            logger.info("lungs epoch %d/%d loss %.4f", epoch + 1, epochs, loss.item())
    per = evaluate_segmenter(model, images[val], masks[val]) if n_val else torch.zeros(0)
    return SegResult(
        model.eval(),
        float(per.mean()) if n_val else float("nan"),
        per.tolist(),
        [names[i] for i in val.tolist()] if names else [],
        time.perf_counter() - t0,
        epochs,
    )


@torch.no_grad()
def evaluate_segmenter(model: LungUNet, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-image Dice of the cleaned-up predicted masks against ``masks``."""
    model.eval()
    pred = model(images) > 0
    cleaned = torch.stack([torch.from_numpy(clean_mask(p[0].numpy()))[None] for p in pred])
    return dice(cleaned, masks)


def clean_mask(mask: np.ndarray) -> np.ndarray:
    """Keep the two largest connected regions (the lungs), holes filled."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask.astype(bool)
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    keep = np.argsort(sizes)[::-1][:2] + 1
    return ndimage.binary_fill_holes(np.isin(labels, keep))


# --- shipped weights and inference ---------------------------------------------------------------


def save_segmenter(model: LungUNet, path: str | Path, info: dict) -> Path:
    """fp16 state dict + ``info`` (Dice, data hash, command) in one ``weights_only``-loadable file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    torch.save({"format": "covidscan-lungseg", "width": model.down[0][0].out_channels, "state_dict": state, "info": info}, path)
    return path


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


def data_hash(images: torch.Tensor, masks: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(images.numpy().tobytes())
    h.update(masks.numpy().tobytes())
    return h.hexdigest()


def train_lungs(data, out, *, epochs: int = 40, seed: int = 0, progress: bool = False) -> dict:
    """``covidscan lungs``: train on ``data`` (a manifest with masks), write ``out/lungseg_unet128.pt``
    and ``out/lungseg.json`` (held-out Dice, per-image Dice, data hash, seconds, the command)."""
    out = Path(out)
    data_text = " ".join(str(d) for d in ([data] if isinstance(data, (str, Path)) else data))
    images, masks, names = load_pairs(data)
    res = train_segmenter(images, masks, epochs=epochs, seed=seed, names=names, progress=progress)
    info = {
        "dice_heldout_mean": res.dice_val,
        "dice_heldout_min": min(res.dice_per_image) if res.dice_per_image else None,
        "heldout_images": len(res.dice_per_image),
        "train_images": len(images) - len(res.dice_per_image),
        "epochs": epochs,
        "seed": seed,
        "seconds": res.seconds,
        "size": SIZE,
        "data": data_text,
        "data_sha256": data_hash(images, masks),
        "command": f"covidscan lungs --data {data_text} --out {out} --epochs {epochs} --seed {seed}",
        "heldout": dict(zip(res.val_names, res.dice_per_image)),
    }
    save_segmenter(res.model, out / SHIPPED, info)
    (out / "lungseg.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return info

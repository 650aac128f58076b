"""Training the lung segmenter of :mod:`covidscan.data.lungs` (``covidscan lungs``): a small U-Net on masks.

Why a small U-Net from scratch (Ronneberger et al. 2015): no segmentation weights install
offline here (torchvision's LR-ASPP / DeepLab weights download at run time), lung fields are
large, smooth, high-contrast shapes that a 0.5 M-parameter network learns from a few hundred
masks, and at 128 x 128 it runs in milliseconds on a CPU.

Trained on ``../shared/data/xray-lungs`` (262 OpenIST adult normal PA films with hand-drawn
masks). Those films are tightly cropped teaching images, so training zooms *out* as well as in
(the film placed on a smaller canvas with a dark or grey surround) to teach the network that
shoulders, neck and abdomen are not lung: the check by eye on every shipped source is
``docs/results/lungs.png``.

Inference (:func:`covidscan.data.lungs.segment_lungs`) needs none of this module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from covidscan.data import load_dataset, read_image
from covidscan.data.lungs import SHIPPED, SIZE, LungUNet, _resize, clean_mask
from covidscan.errors import DataError
from covidscan.results import atomic_write

logger = logging.getLogger(__name__)


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
    with torch.random.fork_rng(devices=[]):  # the initial weights from the seed, the caller's generator untouched
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


def save_segmenter(model: LungUNet, path: str | Path, info: dict) -> Path:
    """fp16 state dict + ``info`` (Dice, data hash, command) in one ``weights_only``-loadable file."""
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    obj = {"format": "covidscan-lungseg", "width": model.down[0][0].out_channels, "state_dict": state, "info": info}
    return atomic_write(path, lambda fh: torch.save(obj, fh))


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

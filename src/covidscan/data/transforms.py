"""Preprocessing and augmentation, as plain tensor maths plus thin torchvision v2 wrappers.

Pipeline (the contract every model input follows):

1. :func:`to_gray_uint8`: a :class:`ScanImage` -> ``1 x S x S`` ``uint8`` tensor. Colour
   scans become gray (ITU-R 601 luma), the image is resized to ``S x S`` (aspect ratio
   not kept, as in the paper) with antialiasing. This is what the cache stores.
2. training only, :func:`build_augment`: rotation, zoom, shift (one ``RandomAffine``) and
   horizontal flip on the ``uint8`` tensor (torchvision transforms v2).
3. :func:`to_input`: ``uint8`` -> ``float32`` in ``[0, 1]``, the gray plane copied to 3
   channels (so colour overlays cannot become a class cue), normalised by the spec's mean / std.

The parameters live in :class:`Preprocess`, which each checkpoint stores, so predict
uses exactly what train used.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from covidscan.config import LUNG_OPTIONS
from covidscan.data.hounsfield import BODY_CROP_VERSION, crop_to_body, window
from covidscan.data.io import ScanImage
from covidscan.data.lungs import MASK_VERSION, apply_lungs, frame_lungs
from covidscan.data.lungs import VERSION as SEGMENTER_VERSION

logger = logging.getLogger(__name__)

PREPROCESS_VERSION = 1  # bump when to_gray_uint8 changes: it keys the on-disk cache


@dataclass(frozen=True)
class Preprocess:
    """How a decoded scan becomes the model's input; stored in every checkpoint.

    image_size: square side in pixels (the scan is stretched to it, as in the paper).
    mean, std: per-channel normalisation of the ``[0, 1]`` input (the backbone spec's).
    equalize: histogram equalisation after resizing (contrast normalisation across sources).
    crop: fraction of width / height cut from each border before resizing (text, markers).
    lung_crop: crop to the box around the lung fields found by thresholding (covidscan.data.lungs).
    lung_mask: set everything outside those lung fields to black (CT: heart, chest wall, table, framing).
    body_crop: CT: crop an axial slice to the body (air, table and text around it cut; covidscan.data.hounsfield).
    lungs: the learned lung mask (covidscan.data.lungs): ``none``, ``crop`` (to the lung box), ``mask``
        (outside the lungs set to the median grey) or ``both``.
    hu_window: CT models: ``(center, width)`` of the lung window that maps a scan's Hounsfield units
        (a CT DICOM slice) to grey, the same window a study's slices get; None for X-ray models.
    version: :data:`PREPROCESS_VERSION` of the code that made it (keys the on-disk cache).
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    version: int = PREPROCESS_VERSION
    equalize: bool = False
    crop: float = 0.0
    lung_crop: bool = False
    lungs: str = "none"
    hu_window: tuple[float, float] | None = None
    body_crop: bool = False
    lung_mask: bool = False

    def __post_init__(self):
        if not isinstance(self.image_size, int) or not 8 <= self.image_size <= 4096:
            raise ValueError(f"image_size={self.image_size!r}: must be an integer from 8 to 4096 pixels")
        values = (*self.mean, *self.std)
        if len(self.mean) != 3 or len(self.std) != 3 or not all(math.isfinite(v) for v in values) or min(self.std) <= 0:
            raise ValueError(f"mean={self.mean}, std={self.std}: need three finite values each, std > 0")
        if not 0 <= self.crop < 0.5:
            raise ValueError(f"crop={self.crop}: must be in [0, 0.5)")
        if self.lungs not in LUNG_OPTIONS:
            raise ValueError(f"lungs={self.lungs!r}: choose one of {', '.join(LUNG_OPTIONS)}")
        if self.hu_window is not None and (
            len(self.hu_window) != 2 or not all(math.isfinite(v) for v in self.hu_window) or self.hu_window[1] <= 0
        ):
            raise ValueError(f"hu_window={self.hu_window}: need a finite centre and a positive width")

    def cache_key(self) -> str:
        """What the decoded, resized uint8 image depends on (keys the on-disk cache)."""
        key = f"{self.image_size}_v{self.version}_eq{int(self.equalize)}_c{self.crop:g}"
        key += "_lung" if self.lung_crop else ""
        key += f"_lmask{MASK_VERSION}" if self.lung_mask else ""
        key += f"_body{BODY_CROP_VERSION}" if self.body_crop else ""
        key += f"_hu{self.hu_window[0]:g}w{self.hu_window[1]:g}" if self.hu_window else ""
        return key + (f"_seg{self.lungs}{SEGMENTER_VERSION}" if self.lungs != "none" else "")

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        """Inverse of :meth:`to_dict`; keys of older versions (``channel_policy``, ``resize``) are ignored. A
        checkpoint whose lung mask (``lung_mask_version``) differs from this version's is loaded with a warning."""
        pre = cls(
            image_size=int(d["image_size"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            version=int(d.get("version", PREPROCESS_VERSION)),
            equalize=bool(d.get("equalize", False)),
            crop=float(d.get("crop", 0.0)),
            lung_crop=bool(d.get("lung_crop", False)),
            lungs=str(d.get("lungs", "none")),
            hu_window=tuple(float(v) for v in d["hu_window"]) if d.get("hu_window") is not None else None,
            body_crop=bool(d.get("body_crop", False)),
            lung_mask=bool(d.get("lung_mask", False)),
        )
        trained_on = int(d.get("lung_mask_version", 1))  # checkpoints written before the mask was versioned: 1
        if pre.lung_mask and trained_on != MASK_VERSION:
            logger.warning(
                "this checkpoint was trained on lung mask version %d; this covidscan draws version %d "
                "(covidscan.data.lungs), so its inputs differ from training: retrain it",
                trained_on, MASK_VERSION,
            )  # fmt: skip
        return pre

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["hu_window"] is None:
            del d["hu_window"]  # X-ray checkpoints keep the layout they always had
        else:
            d["hu_window"] = list(d["hu_window"])
        if not d["body_crop"]:
            del d["body_crop"]  # checkpoints without it keep the layout they always had
        if not d["lung_mask"]:
            del d["lung_mask"]
        else:
            d["lung_mask_version"] = MASK_VERSION  # what the checkpoint was trained on
        return d

    @classmethod
    def for_backbone(
        cls, spec, image_size: int = 0, *, equalize: bool = False, crop: float = 0.0, lung_crop: bool = False, lungs: str = "none",
        hu_window: tuple[float, float] | None = None, body_crop: bool = False, lung_mask: bool = False,
    ) -> Preprocess:  # fmt: skip
        return cls(
            image_size=image_size or spec.input_size,
            mean=spec.mean,
            std=spec.std,
            equalize=equalize,
            crop=crop,
            lung_crop=lung_crop,
            lungs=lungs,
            hu_window=hu_window,
            body_crop=body_crop,
            lung_mask=lung_mask,
        )

    @classmethod
    def from_config(cls, spec, data_cfg, study_cfg=None) -> Preprocess:
        """The preprocessing a :class:`covidscan.config.DataConfig` asks for on backbone ``spec``; a CT task
        takes its lung window from ``study_cfg`` (a :class:`covidscan.config.StudyConfig`, defaults if None)."""
        hu = None
        if data_cfg.task == "ct":
            from covidscan.config import StudyConfig

            st = study_cfg or StudyConfig()
            hu = (float(st.window_center), float(st.window_width))
        return cls.for_backbone(
            spec,
            data_cfg.image_size,
            equalize=data_cfg.equalize,
            crop=data_cfg.crop,
            lung_crop=data_cfg.lung_crop,
            lungs=data_cfg.lungs,
            hu_window=hu,
            body_crop=data_cfg.body_crop,
            lung_mask=data_cfg.lung_mask,
        )


def gray(pixels: np.ndarray) -> np.ndarray:
    """``H x W`` or ``H x W x 3`` float in [0, 1] -> ``H x W`` (ITU-R 601 luma for colour)."""
    if pixels.ndim == 2:
        return pixels
    return pixels @ np.asarray([0.299, 0.587, 0.114], dtype=np.float32)


def to_gray_uint8(scan: ScanImage | np.ndarray, pre: Preprocess | int) -> torch.Tensor:
    """Decoded scan -> ``1 x S x S`` uint8 tensor: (CT slices in Hounsfield units: the lung window
    ``pre.hu_window``), gray, border crop, body crop, lung crop, resize (antialiased), equalisation. Every entry point
    (training, evaluation, predict, the service, CT studies) makes the model's input with this function.

    ``pre`` is a :class:`Preprocess` or just the side ``S`` (no crop, no equalisation).
    Deterministic: the same scan always gives the same tensor.
    """
    size = pre if isinstance(pre, int) else pre.image_size
    pixels = scan.pixels if isinstance(scan, ScanImage) else scan
    hu = scan.hu if isinstance(scan, ScanImage) else None
    if hu is not None and not isinstance(pre, int) and pre.hu_window is not None:
        pixels = window(hu, *pre.hu_window).astype(np.float32) / 255.0  # a CT slice in HU: the model's lung window
    g = gray(pixels)
    crop = 0.0 if isinstance(pre, int) else pre.crop
    if crop > 0:
        h, w = g.shape
        dy, dx = int(round(h * crop)), int(round(w * crop))
        g = g[dy : h - dy, dx : w - dx]
    if not isinstance(pre, int) and pre.body_crop:
        g = crop_to_body(g)
    if not isinstance(pre, int) and pre.lungs != "none":
        g = apply_lungs(g, pre.lungs)
    if not isinstance(pre, int) and (pre.lung_crop or pre.lung_mask):
        g = frame_lungs(g, crop=pre.lung_crop, mask=pre.lung_mask)
    t = torch.from_numpy(np.ascontiguousarray(g, dtype=np.float32))[None]  # 1 x H x W
    t = TF.resize(t, [size, size], interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
    out = (t.clamp(0, 1) * 255).round().to(torch.uint8)
    if not isinstance(pre, int) and pre.equalize:
        out = TF.equalize(out)
    return out


def to_input(x: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """``[N x] 1 x S x S`` uint8 -> ``[N x] 3 x S x S`` float32, normalised (on ``x``'s device)."""
    x = x.float() / 255.0
    x = x.expand(*x.shape[:-3], 3, *x.shape[-2:])  # replicate gray to 3 channels
    mean = torch.tensor(pre.mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(pre.std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def model_input(batch_image: torch.Tensor, pre: Preprocess, device) -> torch.Tensor:
    """A collated batch -> model input on ``device``: uint8 images are moved first (4x fewer
    bytes than float), then normalised there; float tensors (cached features) pass through."""
    x = batch_image.to(device, non_blocking=True)
    return to_input(x, pre) if x.dtype == torch.uint8 else x


class RandomGamma(v2.Transform):
    """``uint8`` image -> ``255 * (x / 255) ** gamma``, gamma log-uniform in ``[1 / (1 + g), 1 + g]``."""

    def __init__(self, g: float):
        super().__init__()
        self.log_max = float(np.log1p(g))

    def transform(self, inpt, params):
        if not isinstance(inpt, torch.Tensor) or inpt.dtype != torch.uint8:
            return inpt
        gamma = float(torch.empty(1).uniform_(-self.log_max, self.log_max).exp())
        return TF.adjust_gamma(inpt, gamma)


class RandomDownUp(v2.Transform):
    """With probability ``p``: resize down by a factor in [1.5, 4] and back up (a lower-resolution source)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def transform(self, inpt, params):
        if not isinstance(inpt, torch.Tensor) or torch.rand(1).item() >= self.p:
            return inpt
        h, w = inpt.shape[-2:]
        f = float(torch.empty(1).uniform_(1.5, 4.0))
        small = TF.resize(inpt, [max(8, int(h / f)), max(8, int(w / f))], antialias=True)
        return TF.resize(small, [h, w], antialias=True)


class RandomNoise(v2.Transform):
    """Gaussian noise with standard deviation ``std`` grey levels on a ``uint8`` image, clipped to [0, 255]."""

    def __init__(self, std: float):
        super().__init__()
        self.std = std

    def transform(self, inpt, params):
        if not isinstance(inpt, torch.Tensor) or inpt.dtype != torch.uint8:
            return inpt
        noisy = inpt.float() + torch.randn(inpt.shape) * self.std
        return noisy.round().clamp(0, 255).to(torch.uint8)


class RandomSharpen(v2.Transform):
    """A sharper CT reconstruction kernel's look (hospitals reconstruct lung slices with kernels from
    soft to very sharp; ``RandomDownUp`` covers the soft end): unsharp masking by torchvision's
    ``adjust_sharpness`` with a factor uniform in [1.5, 3.5] (1 = unchanged, 2 = the image plus once
    its difference from a 3 x 3 smoothing). Applied with a probability by ``v2.RandomApply``."""

    def transform(self, inpt, params):
        if not isinstance(inpt, torch.Tensor):
            return inpt
        return TF.adjust_sharpness(inpt, float(torch.empty(1).uniform_(1.5, 3.5)))


def build_augment(aug, image_size: int) -> v2.Transform | None:
    """Training augmentation on ``1 x S x S`` uint8 tensors; None when disabled.

    The paper's rotation, zoom, shift and horizontal flip (one ``RandomAffine`` and a flip),
    then, each where its setting is non-zero, the source-cue breakers: random resized crop
    (framing), brightness / contrast, gamma, resolution loss, sharpening, JPEG re-encoding and noise.
    Randomness comes from torch's global generator, which the training loop seeds per epoch.
    """
    if not aug.enabled:
        return None
    steps: list[v2.Transform] = []
    if getattr(aug, "crop_scale", 0):
        steps.append(v2.RandomResizedCrop(image_size, scale=(aug.crop_scale, 1.0), ratio=(0.8, 1.25), antialias=True))
    if getattr(aug, "brightness", 0) or getattr(aug, "contrast", 0):
        steps.append(v2.ColorJitter(brightness=aug.brightness or None, contrast=aug.contrast or None))
    if getattr(aug, "gamma", 0):
        steps.append(RandomGamma(aug.gamma))
    steps += [
        v2.RandomAffine(
            degrees=aug.rotation,
            translate=(aug.shift, aug.shift) if aug.shift > 0 else None,
            scale=(1 - aug.zoom, 1 + aug.zoom) if aug.zoom > 0 else None,
            interpolation=v2.InterpolationMode.BILINEAR,
        ),
        v2.RandomHorizontalFlip(p=aug.hflip),
    ]
    if getattr(aug, "blur", 0):
        steps.append(RandomDownUp(aug.blur))
    if getattr(aug, "sharpen", 0):
        steps.append(v2.RandomApply([RandomSharpen()], p=aug.sharpen))
    if getattr(aug, "jpeg", 0):
        steps.append(v2.RandomApply([v2.JPEG((30, 95))], p=aug.jpeg))
    if getattr(aug, "noise", 0):
        steps.append(RandomNoise(aug.noise))
    return v2.Compose(steps)


def batch_augment(x: torch.Tensor, aug, gen: torch.Generator) -> torch.Tensor:
    """The paper's augmentation on a whole batch on its device, every image with its own draw.

    ``x``: ``N x 1 x S x S`` uint8 (on CPU or GPU). Rotation, zoom, shift and horizontal flip as
    one affine warp per image (``affine_grid`` / ``grid_sample``, bilinear, zero fill like
    ``RandomAffine``), then brightness / contrast factors per image. Used by the device-resident
    data path (``train.device_data``), where per-image CPU transforms would starve a GPU; the
    draws come from ``gen`` (a generator on ``x``'s device), not from torch's global one.
    """
    n, dev = x.shape[0], x.device

    def u(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, device=dev, generator=gen) * (hi - lo) + lo

    angle = u(-aug.rotation, aug.rotation) * (np.pi / 180)
    scale = u(1 - aug.zoom, 1 + aug.zoom) if aug.zoom > 0 else torch.ones(n, device=dev)
    tx, ty = (u(-aug.shift, aug.shift) * 2, u(-aug.shift, aug.shift) * 2) if aug.shift > 0 else (torch.zeros(n, device=dev),) * 2
    flip = torch.where(torch.rand(n, device=dev, generator=gen) < aug.hflip, -1.0, 1.0)
    # output -> input coordinates (normalised [-1, 1]): inverse of flip, then scale + rotate, then shift
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    row0 = torch.stack([flip * cos, flip * sin, -flip * (cos * tx + sin * ty)], 1)
    row1 = torch.stack([-sin, cos, sin * tx - cos * ty], 1)
    theta = torch.stack([row0, row1], 1)  # N x 2 x 3
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    b, c = getattr(aug, "brightness", 0.0), getattr(aug, "contrast", 0.0)
    if b:
        out = out * u(1 - b, 1 + b).view(n, 1, 1, 1)
    if c:
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = (out - mean) * u(1 - c, 1 + c).view(n, 1, 1, 1) + mean
    return out.clamp(0, 255).round().to(torch.uint8)

"""Images the service returns inside JSON: PNG bytes, base64-encoded."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from covidscan.explain import display_size, overlay


def _b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def overlay_png(pixels: np.ndarray, cam: np.ndarray) -> str:
    """The scan with its Grad-CAM blended over it."""
    return _b64(Image.fromarray(overlay(pixels, cam)))


def gray_png(pixels: np.ndarray) -> str:
    """The decoded scan as an 8-bit gray PNG at display size (at most DISPLAY_MAX on the longer side)."""
    g = pixels if pixels.ndim == 2 else pixels.mean(2)
    img = Image.fromarray((np.clip(g, 0, 1) * 255).astype(np.uint8))
    h, w = display_size(*g.shape)
    if (h, w) != g.shape:
        img = img.resize((w, h), Image.BILINEAR)
    return _b64(img)


def map_png(cam: np.ndarray) -> str:
    """The map alone as RGBA (jet colour map): the page lays it over the original with an opacity slider."""
    import matplotlib

    return _b64(Image.fromarray((matplotlib.colormaps["jet"](cam) * 255).astype(np.uint8), mode="RGBA"))

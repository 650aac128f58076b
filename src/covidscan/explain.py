"""Grad-CAM (Selvaraju et al. 2017) by hooking the backbone spec's ``cam_layer``.

The map is ``ReLU(sum_k w_k A_k)`` with ``w_k`` the spatial mean of the class score's
gradient with respect to feature map ``A_k``, resized to the image and scaled to [0, 1].
The hooked layer's output is never modified in place (DenseNet's adapter uses a plain
ReLU) and InceptionV3 has no auxiliary output (dropped in its adapter), so one
implementation serves every registered backbone.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

METHODS = ("gradcam", "gradcam++")
METHOD_NAMES = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++"}  # for titles and labels


def grad_cam(
    model, x: torch.Tensor, class_index: int | None = None, size: tuple[int, int] | None = None, method: str = "gradcam"
) -> tuple[np.ndarray, int]:
    """Return ``(cam, class_index)``; ``x`` is ``1 x 3 x S x S``; ``cam`` is ``H x W`` float32 in [0, 1].

    ``method``: ``gradcam`` (channel weights = mean gradient) or ``gradcam++`` (Chattopadhay et al. 2018:
    channel weights = sum of ReLU(gradient) x alpha, alpha = g^2 / (2 g^2 + sum(A) g^3), the closed form
    used by pytorch-grad-cam), which spreads the map over several instances of a class instead of the
    strongest one."""
    if method not in METHODS:
        raise ValueError(f"unknown Grad-CAM method {method!r}; choose {' or '.join(METHODS)}")
    layer_name = model.spec.cam_layer
    try:
        layer = model.get_submodule(layer_name)
    except AttributeError:
        raise ValueError(f"Grad-CAM layer {layer_name!r} not found in {model.spec.name}") from None
    store: dict[str, torch.Tensor] = {}

    def hook(_module, _inp, out):
        store["act"] = out

    handle = layer.register_forward_hook(hook)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            logits = model(x.detach().requires_grad_(True))  # the activation needs a graph even with frozen weights
            k = int(logits.argmax(1).item()) if class_index is None else int(class_index)
            # the gradient of the class score with respect to the hooked activation only: no parameter .grad is
            # allocated (a backward() would fill, and keep, one gradient per weight: 14 MB per EfficientNet-Lite0)
            (grad,) = torch.autograd.grad(logits[0, k], store["act"])
    finally:
        handle.remove()
        model.train(was_training)
    act, grad = store["act"].detach().float(), grad.detach().float()  # 1 x C x h x w
    if method == "gradcam++":
        g2 = grad.pow(2)
        denom = 2 * g2 + act.sum(dim=(2, 3), keepdim=True) * g2 * grad
        alpha = torch.where(grad != 0, g2 / (denom + 1e-7), torch.zeros_like(grad))
        weights = (F.relu(grad) * alpha).sum(dim=(2, 3), keepdim=True)
    else:
        weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * act).sum(1, keepdim=True))  # 1 x 1 x h x w
    out_size = size or tuple(x.shape[-2:])
    cam = F.interpolate(cam, size=out_size, mode="bilinear", align_corners=False)[0, 0]
    top = cam.max()
    cam = cam / top if top > 0 else cam
    return cam.clamp(0, 1).cpu().numpy().astype(np.float32), k


LOW_PROBABILITY = 0.1  # below this, a class's Grad-CAM mostly stretches noise to full scale


def low_probability_warning(class_name: str, probability: float, limit: float = LOW_PROBABILITY) -> str | None:
    """A warning when the explained class is one the model gives little probability; else None."""
    if probability >= limit:
        return None
    return (
        f"the model gives {class_name} probability {probability:.3f} (< {limit}): its Grad-CAM map is scaled to full "
        "range from a weak signal and shows mostly noise, not where the model found that class"
    )


DISPLAY_MAX = 1024  # longest side of heat maps and overlays, whatever the scan's size (bounded memory)


def display_size(height: int, width: int, max_side: int = DISPLAY_MAX) -> tuple[int, int]:
    """``(h, w)`` with the scan's aspect ratio and the longer side at most ``max_side``."""
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def overlay(gray: np.ndarray, cam: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """RGB uint8 at the heat map's size: the scan in gray (resized to ``cam``'s shape) with the map (jet) on top."""
    g = gray if gray.ndim == 2 else gray.mean(2)
    if g.shape != cam.shape:
        t = torch.from_numpy(np.ascontiguousarray(g, dtype=np.float32))[None, None]
        g = F.interpolate(t, size=cam.shape, mode="bilinear", antialias=True, align_corners=False)[0, 0].numpy()
    base = np.repeat(g[..., None], 3, axis=2)
    heat = matplotlib.colormaps["jet"](cam)[..., :3]
    return (np.clip((1 - alpha) * base + alpha * heat, 0, 1) * 255).astype(np.uint8)


def save_overlay(path: str | Path, gray: np.ndarray, cam: np.ndarray, title: str = "", method: str = "gradcam") -> Path:
    """The scan and its Grad-CAM overlay side by side, with a colour bar for the map (relative, 0 to 1)."""
    g = gray if gray.ndim == 2 else gray.mean(2)
    aspect = g.shape[0] / g.shape[1]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.5 * aspect + 0.6))
    axes[0].imshow(g, cmap="gray", vmin=0, vmax=1)
    axes[0].set_title("scan", fontsize=9)
    axes[1].imshow(overlay(gray, cam))
    mappable = plt.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0, 1), cmap="jet")
    fig.colorbar(mappable, ax=axes[1], fraction=0.046, pad=0.02, label=f"{METHOD_NAMES[method]} (relative to its maximum)")
    axes[1].set_title(title or METHOD_NAMES[method], fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

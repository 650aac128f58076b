"""MixStyle (Zhou, Yang, Qiao and Xiang, "Domain generalization with MixStyle", ICLR 2021): a source-cue breaker
that acts on features instead of pixels.

Early CNN feature maps carry the "style" of an image (its per-channel mean and standard deviation over space):
scanner, reconstruction kernel, windowing and publisher's processing show up there, while content (where
the opacities are) is in the normalised map. During training, with probability ``p`` per batch, each image's
style at a few early layers is replaced by a random blend of its own and another image's of the same batch
(``lam ~ Beta(alpha, alpha)``); with the label x source balanced sampler most partners come from another
source, so the network cannot lean on one hospital's style.

Only active inside :func:`mixing_styles`, which the training loop wraps around the optimisation steps:
validation, precise BatchNorm, checkpoints and inference never see it, and the checkpoint's weights load
into a plain model (the hooks hold no parameters).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from covidscan.errors import ConfigError


def mix_styles(x: torch.Tensor, alpha: float = 0.1, eps: float = 1e-6) -> torch.Tensor:
    """``x`` (``N x C x H x W``) with each image's channel means and standard deviations blended with those of a
    random other image of the batch. Statistics are computed in float32 and detached, as in the paper, so
    gradients flow through the normalised content only."""
    n = x.shape[0]
    if n < 2:
        return x
    xf = x.float()
    mu = xf.mean(dim=(2, 3), keepdim=True).detach()
    sig = (xf.var(dim=(2, 3), keepdim=True) + eps).sqrt().detach()
    lam = torch.distributions.Beta(alpha, alpha).sample((n, 1, 1, 1)).to(x.device)
    perm = torch.randperm(n, device=x.device)
    mu_mix = lam * mu + (1 - lam) * mu[perm]
    sig_mix = lam * sig + (1 - lam) * sig[perm]
    out = (xf - mu) / sig * sig_mix + mu_mix
    return out.to(x.dtype)


def _style_hook(p: float, alpha: float):
    def hook(module: nn.Module, inputs, output):
        if not isinstance(output, torch.Tensor) or output.dim() != 4:
            return None
        if float(torch.rand(())) >= p:  # the global generator: seeded per epoch by the training loop
            return None
        return mix_styles(output, alpha)

    return hook


def style_modules(model: nn.Module, layers: Sequence[str]) -> list[nn.Module]:
    """The submodules named in ``layers`` (a backbone spec's ``style_layers``); an unknown name raises ConfigError."""
    out = []
    for name in layers:
        try:
            out.append(model.get_submodule(name))
        except AttributeError:
            raise ConfigError(f"train.mixstyle: the model has no layer {name!r} (BackboneSpec.style_layers)") from None
    return out


@contextmanager
def mixing_styles(model: nn.Module, layers: Sequence[str], p: float, alpha: float = 0.1) -> Iterator[None]:
    """Within the block, the outputs of ``layers`` get their styles mixed (probability ``p`` per layer and
    batch); ``p`` = 0 or no layers: nothing is hooked. The hooks are removed on exit, errors included."""
    if p <= 0:
        yield
        return
    if not layers:
        raise ConfigError("train.mixstyle is set, but this backbone names no style_layers to mix after")
    handles = [m.register_forward_hook(_style_hook(p, alpha)) for m in style_modules(model, layers)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()

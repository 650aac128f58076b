"""Typed configuration: frozen dataclasses; recipes (YAML in ``configs/``) only supply values.

Sections: ``data`` (task, input size, split, preprocessing), ``augment`` (the paper's
geometry plus source-cue breakers), ``model`` (backbone, head, weights) and ``train``
(optimiser, epochs, sampler, device).

``load_config(path, overrides)`` reads a recipe, applies ``section.key=value`` overrides
(values parsed as YAML scalars, then checked against the field's type) and returns a
:class:`Config`. ``save_config`` writes the resolved copy saved in each run folder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from covidscan.errors import ConfigError
from covidscan.labels import TASKS


@dataclass(frozen=True)
class DataConfig:
    task: str = "xray"  # xray | ct: fixes the class list (covidscan.labels)
    image_size: int = 0  # square input side in pixels; 0 = the backbone's native size
    protocol: str = "grouped"  # grouped (patient-level) | paper (image-level 80/20, leaks patients)
    test: float = 0.2  # fraction of images (whole groups) held out for test
    val: float = 0.1  # fraction for validation (model selection / early stopping)
    split_seed: int = 0
    cache: bool = True  # decode + resize every image once, keep the uint8 result for later epochs
    cache_dir: str = "auto"  # on-disk cache folder; "auto" = user cache (~/.cache/covidscan); "" = memory only
    equalize: bool = False  # histogram equalisation (contrast normalisation); stored in the checkpoint
    crop: float = 0.0  # fraction cut from each border before resizing (text, markers); stored in the checkpoint
    lung_crop: bool = False  # crop to the lung fields (heuristic box, covidscan.data.lungs); stored in the checkpoint
    body_crop: bool = False  # CT: crop each slice to the body (covidscan.data.hounsfield); stored in the checkpoint
    lung_mask: bool = False  # black outside the lung fields (heuristic mask, covidscan.data.lungs); stored in the checkpoint
    lungs: str = "none"  # learned lung mask (covidscan.data.lungs): none | crop | mask | both; stored in the checkpoint
    num_workers: int = -1  # DataLoader workers; -1 = 0 on CPU (compute-bound), min(8, cores) on CUDA
    allow_empty_class: bool = False  # train even when a class of the task has no training image (else an error)
    # leave out, before splitting, the images whose source name contains one of these comma-separated terms
    # (case-insensitive), e.g. "kermany" for an adult-only model; stored in the run's config
    exclude: str = ""


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation (Berrimi et al.: rotation, zoom, horizontal flip, shift)."""

    enabled: bool = True
    rotation: float = 10.0  # degrees, uniform in [-rotation, rotation]
    zoom: float = 0.1  # scale uniform in [1 - zoom, 1 + zoom]
    shift: float = 0.1  # translation up to this fraction of the side, both axes
    hflip: float = 0.5  # probability of a horizontal flip
    brightness: float = 0.0  # intensity augmentation: brightness factor in [1 - b, 1 + b]
    contrast: float = 0.0  # contrast factor in [1 - c, 1 + c]
    # source-cue breaking (what differs between collections rather than between diseases):
    crop_scale: float = 0.0  # random resized crop keeping this minimum area fraction (framing); 0 = off
    gamma: float = 0.0  # gamma drawn log-uniformly in [1 / (1 + g), 1 + g] (exposure, display curve)
    blur: float = 0.0  # probability of a resolution loss: down-sampling by 1.5-4x, then back up
    sharpen: float = 0.0  # probability of unsharp masking (factor 1.5-3.5): a sharper CT reconstruction kernel
    jpeg: float = 0.0  # probability of JPEG re-encoding at a random quality in [30, 95]
    noise: float = 0.0  # standard deviation of added Gaussian noise, in grey levels of 255 (detector noise)


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "densenet121"  # a registered backbone (covidscan.models.list_backbones)
    head: str = "linear"  # linear (paper baselines) | paper (New-DenseNet head)
    weights: str = "imagenet"  # none | imagenet | path to a state dict
    download: bool = True  # let torchvision download ImageNet weights when not cached
    freeze_backbone: bool = False  # train the head only (backbone in eval mode, no gradients)
    dropout: float = -1.0  # head dropout; -1 = the head's default (linear 0.0, paper 0.5)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 50
    batch_size: int = 16
    lr: float = 1e-4  # Adam learning rate (paper: 1e-4)
    weight_decay: float = 0.0
    early_stopping: int = 0  # stop after this many epochs without validation improvement; 0 = off
    monitor: str = "val_loss"  # val_loss | val_acc: what selects the best epoch (never test)
    log: str = "none"  # none | tensorboard (event files in RUN/tensorboard; needs the tensorboard package)
    class_weights: bool = False  # weight the loss by inverse class frequency in train
    mixup: float = 0.0  # mixup (Zhang et al. 2018): blend each batch with a shuffled copy, weight ~ Beta(a, a); 0 = off
    mixstyle: float = 0.0  # MixStyle (Zhou et al. 2021): probability per batch and early layer of blending feature styles across images; 0 = off
    adversary: float = 0.0  # conditional source adversary (DANN / CDANN): weight of its reversed gradient, ramped from 0; 0 = off
    sampler: str = "plain"  # plain (shuffle) | balanced (equal draws per label x source cell)
    strata: str = ""  # balanced sampler: also split cells by this manifest field (e.g. view: label x source x view)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # bf16 autocast on CUDA
    cpu_bf16: bool = False  # bf16 autocast on CPU (off: 9x slower on CPUs without native bf16, measured)
    channels_last: bool = True  # NHWC memory format (CPU and CUDA)
    max_batches: int = 0  # cap train batches per epoch (smoke tests); 0 = all
    swa_start: int = 0  # average the weights of every step from this epoch on (SWA), save it as best.pt; 0 = off
    precise_bn: int = 0  # after each epoch, re-estimate BatchNorm statistics on this many training images (0 = off)
    device_data: bool = False  # keep the decoded uint8 images on the training device, augment whole batches there
    feature_cache: bool = True  # frozen backbone + no augmentation: compute backbone features once, train the head on them
    checkpoint_every: int = 0  # also save RUN/step.pt every this many optimizer steps (resume mid-epoch); 0 = off


@dataclass(frozen=True)
class StudyConfig:
    """CT studies (covidscan.study): how a volume in Hounsfield units becomes slices for the slice model,
    and how slice scores become one patient result. Stored in the checkpoint with the rest of the config."""

    window_center: float = -600.0  # lung window mapped to 0..255 (HU); measured in docs/results/ct_volumes.md
    window_width: float = 1500.0
    frame: str = "none"  # none (the whole slice) | lungs: crop each slice to its lung box + 12% (measured worse: ct_volumes.md)
    rule: str = "topk"  # topk (mean of the top fraction of lung slices) | mean | max | noisy_or
    top: float = 0.25  # topk: fraction of the lung slices averaged (at least 3 slices)
    min_lung: float = 0.25  # keep slices whose lung area is at least this fraction of the volume's largest


@dataclass(frozen=True)
class Config:
    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    study: StudyConfig = field(default_factory=StudyConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _coerce(value, typ, where: str):
    if isinstance(typ, str):  # annotations are strings under `from __future__ import annotations`
        typ = _TYPES[typ]
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if typ is str:
        return str(value)
    raise ConfigError(f"{where}: unsupported type {typ}")


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; valid: {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        if cls is Config and name != "name":
            kwargs[name] = _build(_section_cls(name), value or {}, f"{where}.{name}")
        else:
            kwargs[name] = _coerce(value, fields[name].type, f"{where}.{name}")
    return cls(**kwargs)


def _section_cls(name: str):
    return {"data": DataConfig, "augment": AugmentConfig, "model": ModelConfig, "train": TrainConfig, "study": StudyConfig}[name]


def config_from_dict(values: dict, where: str = "config") -> Config:
    cfg = _build(Config, values, where)
    validate(cfg)
    return cfg


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings to a nested dict (values parsed as YAML scalars)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. train.epochs=3")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        value = yaml.safe_load(raw) if raw.strip() else ""
        if len(parts) == 1 and parts[0] == "name":
            out["name"] = str(value)
        elif len(parts) == 2 and parts[0] in _SECTIONS:
            out.setdefault(parts[0], {})[parts[1]] = value
        else:
            raise ConfigError(f"override {item!r}: key must be name or one of {sorted(set(_SECTIONS) - {'name'})}.<field>")
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe (or start from defaults when ``path`` is None) and apply overrides."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config not found")
        with open(path, encoding="utf-8") as fh:
            values = yaml.safe_load(fh) or {}
        values.setdefault("name", path.stem)
    return config_from_dict(apply_overrides(values, overrides or []), str(path or "config"))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")


#: the choice lists of the settings below: one owner each (transforms, splits, the paper protocol and the
#: CLI read them from here; heads and backbones come from the model registry)
LUNG_OPTIONS = ("none", "crop", "mask", "both")
PROTOCOLS = ("paper", "grouped")  # the paper's image-level split and covidscan's patient-grouped one
SAMPLERS = ("plain", "balanced")
MONITORS = ("val_loss", "val_acc")
LOGGERS = ("none", "tensorboard")
STUDY_FRAMES = ("lungs", "none")
STUDY_RULES = ("topk", "mean", "max", "noisy_or")


def _choose(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r}; choose {' | '.join(map(str, choices))}")


#: augmentations the device-resident batch path (transforms.batch_augment) does not implement
BATCH_PATH_LACKS = ("crop_scale", "gamma", "blur", "sharpen", "jpeg", "noise")


def validate(cfg: Config) -> None:
    """Check values the types cannot (ranges, choices, the backbone name); raises :class:`ConfigError`."""
    from covidscan.models import HEADS, get_backbone, list_backbones  # not at the top: reading a recipe needs no torch

    _choose("data.task", cfg.data.task, sorted(TASKS))
    _choose("data.protocol", cfg.data.protocol, PROTOCOLS)
    if cfg.data.image_size and cfg.data.image_size < 32:
        raise ConfigError(f"data.image_size={cfg.data.image_size}: at least 32 pixels")
    _choose("data.lungs", cfg.data.lungs, LUNG_OPTIONS)
    if cfg.data.body_crop and cfg.data.task != "ct":
        raise ConfigError("data.body_crop=true cuts axial CT slices to the body: set data.task=ct, or leave it off for X-rays")
    st = cfg.study
    if st.window_width <= 0:
        raise ConfigError(f"study.window_width must be > 0 (got {st.window_width})")
    _choose("study.frame", st.frame, STUDY_FRAMES)
    _choose("study.rule", st.rule, STUDY_RULES)
    if not 0 < st.top <= 1 or not 0 <= st.min_lung <= 1:
        raise ConfigError(f"study.top must be in (0, 1] (got {st.top}) and study.min_lung in [0, 1] (got {st.min_lung})")
    _choose("train.log", cfg.train.log, LOGGERS)
    _choose("model.head", cfg.model.head, sorted(HEADS))
    _choose("train.sampler", cfg.train.sampler, SAMPLERS)
    if not 0 <= cfg.data.crop < 0.5:
        raise ConfigError(f"data.crop={cfg.data.crop}: must be in [0, 0.5)")
    _choose("train.monitor", cfg.train.monitor, MONITORS)
    a = cfg.augment
    if not (
        0 <= a.crop_scale <= 1 and a.gamma >= 0 and 0 <= a.blur <= 1 and 0 <= a.sharpen <= 1 and 0 <= a.jpeg <= 1 and a.noise >= 0
    ):
        raise ConfigError("augment: crop_scale, blur, sharpen and jpeg must be in [0, 1]; gamma and noise must be >= 0")
    batch_less = [k for k in BATCH_PATH_LACKS if getattr(a, k)]
    if cfg.train.device_data and a.enabled and batch_less:
        listed = ", ".join(f"augment.{k}={getattr(a, k):g}" for k in batch_less)
        raise ConfigError(
            f"train.device_data augments whole batches with rotation, zoom, shift, flip, brightness and contrast only; "
            f"this recipe also sets {listed}, which that path would drop: set train.device_data=false (the DataLoader "
            "path applies every augmentation)"
        )
    if cfg.train.epochs < 1 or cfg.train.batch_size < 1 or cfg.train.lr <= 0:
        raise ConfigError("train.epochs, train.batch_size and train.lr must be positive")
    if cfg.train.strata and cfg.train.sampler != "balanced":
        raise ConfigError(f"train.strata={cfg.train.strata!r} splits the balanced sampler's cells: set train.sampler=balanced")
    if not 0 <= cfg.train.swa_start <= cfg.train.epochs:
        raise ConfigError(
            f"train.swa_start={cfg.train.swa_start}: an epoch in 1..train.epochs ({cfg.train.epochs}), or 0 for off"
        )
    if cfg.train.mixup < 0:
        raise ConfigError(f"train.mixup={cfg.train.mixup}: must be >= 0 (the Beta distribution's parameter; 0 = off)")
    if not 0 <= cfg.train.mixstyle <= 1:
        raise ConfigError(f"train.mixstyle={cfg.train.mixstyle}: a probability in [0, 1] (0 = off)")
    if cfg.train.adversary < 0:
        raise ConfigError(f"train.adversary={cfg.train.adversary}: must be >= 0 (the reversed gradient's weight; 0 = off)")
    if cfg.train.adversary and cfg.model.freeze_backbone:
        raise ConfigError("train.adversary shapes the backbone's features: it needs model.freeze_backbone=false")
    if cfg.train.adversary and cfg.train.mixup:
        raise ConfigError("train.adversary and train.mixup together: a blended image has no one source; set one of them to 0")
    if cfg.model.backbone not in list_backbones():
        raise ConfigError(f"unknown backbone {cfg.model.backbone!r}; registered: {', '.join(list_backbones())}")
    least = get_backbone(cfg.model.backbone).min_size
    if cfg.train.mixstyle and not get_backbone(cfg.model.backbone).style_layers:
        raise ConfigError(f"train.mixstyle: backbone {cfg.model.backbone!r} names no style_layers to mix after")
    if cfg.data.image_size and cfg.data.image_size < least:
        raise ConfigError(f"data.image_size={cfg.data.image_size}: {cfg.model.backbone} needs at least {least} pixels")


def replace_cfg(cfg: Config, **sections) -> Config:
    """``replace_cfg(cfg, train={"epochs": 1})``: a copy with some fields of some sections changed (validated)."""
    out = dataclasses.replace(cfg, **{k: dataclasses.replace(getattr(cfg, k), **v) for k, v in sections.items()})
    validate(out)
    return out


def config_diff(a: Config, b: Config) -> dict[str, tuple]:
    """``{"train.epochs": (3, 5), ...}``: the fields whose values differ between two configs."""
    da, db = a.to_dict(), b.to_dict()
    out = {}
    for section, values in da.items():
        if isinstance(values, dict):
            for k, v in values.items():
                if db[section].get(k) != v:
                    out[f"{section}.{k}"] = (v, db[section].get(k))
        elif db.get(section) != values:
            out[section] = (values, db.get(section))
    return out

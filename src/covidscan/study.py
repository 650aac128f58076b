"""CT studies: a volume in Hounsfield units -> slices the slice model reads -> one patient result.

1. **Window**: HU -> 8 bits with a lung window (``study.window_center`` / ``window_width``, default
   -600 / 1500, stored in the checkpoint's config): ``grey = 255 * clip((HU - (c - w/2)) / w, 0, 1)``.
2. **Lung slices**: per slice, the body is what is above -500 HU with its holes filled; lung is below
   -400 HU inside it. Slices whose lung area is at least ``study.min_lung`` of the volume's largest
   (and at least 1% of the slice) are scored; the others (neck, abdomen) are not.
3. **Framing** (``study.frame``): ``none`` (default) scores the whole slice; ``lungs`` cuts each scored slice
   to its lung box plus a 12% margin, framed like the screenshot-style training slices (Soares et al.).
   Measured on the three COVID-CT-MD series, framing lowered both slice-level AUROCs (0.50 -> 0.38 and
   0.74 -> 0.69) and the COVID / normal patient margin, so it is an option, not the default.
4. **Aggregation** (``study.rule``): ``topk`` (default) = mean of the highest ``study.top`` fraction of
   the lung-slice COVID probabilities (at least 3 slices). Why: infection covers part of the lungs
   (41 of 74 slices for the COVID-CT-MD patient here), so the mean over all slices dilutes it, while the
   maximum or a noisy-OR lets one false-positive slice decide; measured side by side in
   ``docs/results/ct_volumes.md``. ``mean``, ``max`` and ``noisy_or`` (``1 - prod(1 - p)``) are options.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from covidscan.config import StudyConfig
from covidscan.data.hounsfield import MIN_LUNG_PIXELS, lung_mask, subsample_factor, window
from covidscan.data.io import ScanImage
from covidscan.data.volume import Volume, read_volume

FRAME_MARGIN = 0.12
#: a study's label when no slice could be scored (no lung found): never "normal"
UNDETERMINED = "undetermined"


def _subsample(vol: Volume) -> int:
    return subsample_factor(vol.hu.shape)


def small_lung_masks(vol: Volume, which=None) -> dict[int, np.ndarray]:
    """Lung masks of the slices in ``which`` (default: all), found on slices subsampled to <= MASK_SIDE."""
    f = _subsample(vol)
    return {int(i): lung_mask(vol.hu[i][::f, ::f]) for i in (range(vol.n_slices) if which is None else which)}


def lung_areas(vol: Volume, masks: dict[int, np.ndarray] | None = None) -> np.ndarray:
    """Fraction of each slice's pixels that is lung."""
    masks = masks if masks is not None else small_lung_masks(vol)
    return np.array([masks[i].mean() for i in range(vol.n_slices)], dtype=np.float64)


def slice_boxes(vol: Volume, which, masks: dict[int, np.ndarray] | None = None) -> dict[int, tuple[int, int, int, int]]:
    """The framing box of each slice in ``which`` (from its subsampled lung mask, scaled back)."""
    f = _subsample(vol)
    h, w = vol.hu.shape[1:]
    masks = masks if masks is not None else small_lung_masks(vol, which)
    boxes = {}
    for i in which:
        t, b, lft, r = lung_box(masks[int(i)])
        boxes[int(i)] = (t * f, min(h, b * f), lft * f, min(w, r * f))
    return boxes


def select_slices(areas: np.ndarray, min_lung: float) -> np.ndarray:
    """Boolean mask of the slices to score: lung area >= ``min_lung`` x the largest and >= 1% of the slice."""
    if areas.size == 0 or areas.max() <= 0:
        return np.zeros(areas.shape, bool)
    return (areas >= min_lung * areas.max()) & (areas >= MIN_LUNG_PIXELS)


def lung_box(mask: np.ndarray, margin: float = FRAME_MARGIN) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` of the mask's box, widened by ``margin`` of its size, inside the image."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    h, w = mask.shape
    if rows.size == 0:
        return 0, h, 0, w
    t, b, lft, r = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    mh, mw = int(round((b - t) * margin)), int(round((r - lft) * margin))
    return max(0, t - mh), min(h, b + mh), max(0, lft - mw), min(w, r + mw)


def slice_image(hu_slice: np.ndarray, cfg: StudyConfig, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """One axial slice -> the uint8 image the slice model reads (windowed, framed to ``box`` or its own lung box)."""
    img = window(hu_slice, cfg.window_center, cfg.window_width)
    if cfg.frame == "lungs":
        t, b, lft, r = box or lung_box(lung_mask(hu_slice))
        img = img[t:b, lft:r]
    return img


def aggregate(probs, rule: str = "topk", top: float = 0.25) -> float:
    """Slice probabilities -> one study probability (see the module docstring for the rules)."""
    p = np.sort(np.asarray(probs, dtype=np.float64))[::-1]
    if p.size == 0:
        return float("nan")
    if rule == "topk":
        k = min(p.size, max(3, math.ceil(top * p.size)))
        return float(p[:k].mean())
    if rule == "mean":
        return float(p.mean())
    if rule == "max":
        return float(p[0])
    if rule == "noisy_or":
        return float(1.0 - np.prod(1.0 - p))
    raise ValueError(f"unknown aggregation rule {rule!r}; choose topk, mean, max or noisy_or")


#: a study whose lung slices score positive this often (nearly all) gets a warning instead of a plain finding
EVERYWHERE = 0.9


def slice_spread(probs, threshold: float) -> dict:
    """The scored slices' probabilities in brief: 10th percentile, median, 90th percentile, and the share at or
    above ``threshold``."""
    p = np.asarray(probs, dtype=np.float64)
    q10, q50, q90 = np.quantile(p, [0.1, 0.5, 0.9])
    return {"p10": float(q10), "median": float(q50), "p90": float(q90), "share_high": float((p >= threshold).mean())}


@dataclass
class StudyResult:
    """One study's result: ``probability`` (of ``positive_class``), ``label``, and per-slice rows."""

    study: str
    probability: float
    label: str
    positive_class: str
    rule: str
    slices: list[dict] = field(default_factory=list)  # index, name, position_mm, lung_area, scored, probability
    summary: str = ""
    warnings: list[str] = field(default_factory=list)
    spread: dict = field(default_factory=dict)  # the scored slices' probabilities: p10, median, p90, share at or above t

    @property
    def scored(self) -> list[dict]:
        return [s for s in self.slices if s["scored"]]

    def to_dict(self) -> dict:
        return {
            "study": self.study, "probability": None if self.probability != self.probability else self.probability,
            "label": self.label,
            "positive_class": self.positive_class, "rule": self.rule, "n_slices": len(self.slices),
            "n_scored": len(self.scored), "volume": self.summary, "warnings": self.warnings, "spread": self.spread,
        }  # fmt: skip

    def line(self) -> str:
        warn = f"  [{'; '.join(self.warnings)}]" if self.warnings else ""
        if self.label == UNDETERMINED:
            return f"{self.study}: {UNDETERMINED}  (no lung slice scored of {len(self.slices)}; {self.summary}){warn}"
        sp = self.spread
        spread = f"; slices p10 / median / p90 {sp['p10']:.2f} / {sp['median']:.2f} / {sp['p90']:.2f}" if sp else ""
        return (
            f"{self.study}: {self.label}  p({self.positive_class})={self.probability:.3f}  "
            f"({self.rule} of {len(self.scored)} lung slices of {len(self.slices)}{spread}; {self.summary}){warn}"
        )


def study_config(predictor, overrides=()) -> StudyConfig:
    """The checkpoint's study settings (``predictor``: a Predictor or a checkpoint's meta; defaults for
    checkpoints written before they existed), with
    ``overrides`` such as ``["window_center=-650", "rule=max"]`` applied and validated.

    Raises:
        ConfigError: an unknown key or a value out of range.
    """
    from covidscan.config import apply_overrides, config_from_dict

    meta = getattr(predictor, "meta", predictor)
    values = (meta.config or {}).get("study") or {}
    known = {f for f in StudyConfig.__dataclass_fields__}
    base = {"study": {k: v for k, v in values.items() if k in known}}
    return config_from_dict(apply_overrides(base, [f"study.{o}" for o in overrides]), "study settings").study


def slice_scans(vol: Volume, cfg: StudyConfig) -> tuple[np.ndarray, np.ndarray, list[ScanImage | None]]:
    """Lung areas, the scored-slice mask and a :class:`ScanImage` for each scored slice (None elsewhere)."""
    masks = small_lung_masks(vol)  # once: areas pick the slices, boxes frame them
    areas = lung_areas(vol, masks)
    keep = select_slices(areas, cfg.min_lung)
    boxes = slice_boxes(vol, np.flatnonzero(keep), masks) if cfg.frame == "lungs" else {}
    scans = [
        ScanImage(pixels=slice_image(vol.hu[i], cfg, boxes.get(i)).astype(np.float32) / 255.0, format="CT", mode="HU",
                  path=Path(vol.names[i]))
        if keep[i] else None
        for i in range(vol.n_slices)
    ]  # fmt: skip
    return areas, keep, scans


def lung_slice_images(vol: Volume, cfg: StudyConfig, pre) -> list:
    """The scored slices of ``vol`` as the model's ``1 x S x S`` uint8 inputs (``pre``: its preprocessing)."""
    from covidscan.data.transforms import to_gray_uint8

    return [to_gray_uint8(sc, pre) for sc in slice_scans(vol, cfg)[2] if sc is not None]


def predict_study(predictor, study, *, cfg: StudyConfig | None = None, batch: int | None = None) -> StudyResult:
    """Score a study (a path or a :class:`Volume`) with a CT slice :class:`~covidscan.inference.Predictor`.

    ``batch``: default 4 on CPU, measured fastest per slice on a 2-core CPU for EfficientNet-Lite0 (18 ms against
    22 at 1 and 45 at 32, whose activations leave the cache); 64 on a GPU."""
    import torch

    if predictor.task != "ct":
        from covidscan.errors import DataError

        raise DataError(f"CT studies need a CT model; this checkpoint is for {predictor.task}")
    vol = study if isinstance(study, Volume) else read_volume(study)
    cfg = cfg or study_config(predictor)
    batch = batch or (4 if str(predictor.device).startswith("cpu") else 64)
    areas, keep, scans = slice_scans(vol, cfg)
    positive = "covid"
    k = predictor.class_names.index(positive)
    probs = np.full(vol.n_slices, np.nan)
    idx = np.flatnonzero(keep)
    for start in range(0, idx.size, batch):
        part = idx[start : start + batch]
        x = torch.cat([predictor.tensor(scans[i]) for i in part])
        probs[part] = predictor.probabilities(x)[:, k]
    warnings = []
    if idx.size == 0:
        warnings.append("no slice with lung found: is this a chest CT in Hounsfield units?")
    if vol.gaps:
        warnings.append(f"{len(vol.gaps)} gap(s) between slices")
    p = aggregate(probs[idx], cfg.rule, cfg.top) if idx.size else float("nan")
    thr = predictor.meta.threshold or {}
    # a threshold calibrated on studies (covidscan calibrate on a studies folder) decides studies; one set on single
    # slices does not: a study score is an aggregate of slices, on another scale
    t = thr["value"] if thr.get("class") == positive and thr.get("level") == "study" else 0.5
    other = [c for c in predictor.class_names if c != positive][0]
    label = UNDETERMINED if idx.size == 0 else positive if p >= t else other
    spread = slice_spread(probs[idx], t) if idx.size else {}
    if spread and idx.size >= 10 and spread["share_high"] >= EVERYWHERE:
        warnings.append(
            f"{spread['share_high']:.0%} of the lung slices score as {positive}: infection rarely reaches every slice, so this "
            "more likely reflects the scanner or protocol than disease; do not read the study score as a finding "
            "without a threshold set on this site's own studies"
        )
    rows = [
        {"index": i, "name": vol.names[i], "position_mm": float(vol.positions[i]), "lung_area": float(areas[i]),
         "scored": bool(keep[i]), "probability": None if np.isnan(probs[i]) else float(probs[i])}
        for i in range(vol.n_slices)
    ]  # fmt: skip
    return StudyResult(vol.source, p, label, positive, cfg.rule, rows, vol.summary(), warnings, spread)


def slice_views(predictor, result: StudyResult, volume: Volume, *, heatmaps: bool = True) -> list[dict]:
    """Every scored slice as the model saw it, for review: ``index``, ``position_mm``, ``probability``, ``image``
    (``H x W`` float in [0, 1], the lung window) and, with ``heatmaps``, ``cam`` (Grad-CAM of the positive class)."""
    cfg = study_config(predictor)
    scans = slice_scans(volume, cfg)[2]
    views = []
    for r in result.scored:
        scan = scans[r["index"]]
        view = {"index": r["index"], "position_mm": r["position_mm"], "probability": r["probability"], "image": scan.pixels}
        if heatmaps:
            view["cam"] = predictor.explain(scan, result.positive_class)[0]
        views.append(view)
    return views


def find_studies(paths) -> tuple[list[Path], list[Path]]:
    """Split ``paths`` into CT studies (:func:`covidscan.data.volume.study_paths`: series folders, NIfTI and zip
    files, a studies folder's manifest) and the other files to read as single images."""
    from covidscan.data.io import is_image_file
    from covidscan.data.volume import study_paths

    studies, images = [], []
    for p in map(Path, paths):
        found = study_paths(p)
        studies += found
        if p.is_dir():
            inside = set(found)
            images += sorted(
                f for f in p.rglob("*")
                if f.is_file() and not f.name.startswith(".") and is_image_file(f) and inside.isdisjoint(f.parents)
            )  # fmt: skip
        elif not found:
            images.append(p)  # an image, or a missing path: predict reports it
    return studies, images


def read_studies(data) -> tuple[Path, list[dict], dict[str, int]]:
    """A folder of studies (or its ``manifest.csv``): the folder, the manifest's rows and the
    ``slice_labels.csv`` infection labels beside it (``{"<series>/<file>": 0|1}``, empty without)."""
    root = Path(data)
    root = root.parent if root.is_file() else root
    with open(root / "manifest.csv", newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    infection = {}
    if (root / "slice_labels.csv").is_file():
        with open(root / "slice_labels.csv", newline="", encoding="utf-8-sig") as fh:
            infection = {Path(r["file"]).as_posix(): int(r["infection"]) for r in csv.DictReader(fh)}
    return root, rows, infection


def study_truth(row: dict) -> str:
    """``covid`` or ``normal`` (non-COVID) for a studies manifest row: ``task_label``, else ``label``."""
    return "covid" if (row.get("task_label") or row["label"]) == "covid" else "normal"


def export_slices(data, out, *, cfg: StudyConfig | None = None, source: str = "") -> dict:
    """Write the lung slices of a folder of studies as a slice dataset ``out/<label>/*.png`` with
    ``out/manifest.csv`` (``file,label,group_id,patient_id,source,series,slice``), windowed and framed
    exactly as :func:`predict_study` shows them to the slice model, so a site's own CT can be trained on,
    left out in ``covidscan loso``, or evaluated slice by slice.

    Labels (task ``ct``): slices of non-COVID studies (``task_label``, else ``label``; ``cap`` counts as
    non-COVID) are ``normal``; slices of COVID studies are ``covid`` only where ``slice_labels.csv``
    marks infection (clear slices of a COVID patient are left out: they show no COVID); without slice
    labels every lung slice of a COVID study is ``covid``. ``group_id`` is the study, so splits keep a
    patient's slices together. Returns counts per label.
    """
    from PIL import Image

    root, studies, infection = read_studies(data)
    out = Path(out)
    cfg = cfg or StudyConfig()
    rows, counts = [], {"covid": 0, "normal": 0, "left_out_clear_covid": 0}
    for st in studies:
        truth = study_truth(st)
        vol = read_volume(root / st["series"])
        _, keep, scans = slice_scans(vol, cfg)
        name = Path(st["series"]).name
        for i in np.flatnonzero(keep):
            inf = infection.get((Path(st["series"]) / vol.names[i]).as_posix())
            if truth == "covid" and inf == 0:
                counts["left_out_clear_covid"] += 1
                continue
            rel = f"{truth}/{name}_{i:04d}.png"
            (out / truth).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.round(scans[i].pixels * 255).astype(np.uint8)).save(out / rel)
            counts[truth] += 1
            rows.append({
                "file": rel, "label": truth, "group_id": f"{root.name}:{name}", "patient_id": st.get("patient_id", name),
                "source": source or st.get("source") or root.name, "series": st["series"], "slice": vol.names[i],
            })  # fmt: skip
    if not rows:
        from covidscan.errors import DataError

        raise DataError(f"{root}: no lung slice found in any study")
    with open(out / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return counts

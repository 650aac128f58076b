"""Per-class metrics over a whole split, with bootstrap confidence intervals and calibration.

All functions take whole-split probabilities ``probs`` (``N x C``, rows sum to 1) and
integer labels ``y`` (``N``). Per class (one-vs-rest): sensitivity (recall), specificity,
PPV (precision), NPV, F1, AUROC and AUPRC (scikit-learn). A value that is undefined on the
data (a class with no positives has no sensitivity or AUROC) is ``nan``, never 0, and macro
averages skip it. Intervals are percentile bootstraps; with groups given, whole groups
(patients) are resampled, so correlated images of one patient do not narrow the interval.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import average_precision_score, roc_auc_score

PER_CLASS = ("sensitivity", "specificity", "ppv", "npv", "f1", "auroc", "auprc")


def confusion_matrix(y: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``cm[t, p]``: images of true class t predicted as p."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y, int), np.asarray(pred, int)), 1)
    return cm


def _div(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def metrics_from_confusion(cm: np.ndarray) -> dict[str, list[float]]:
    """Sensitivity, specificity, PPV, NPV and F1 per class from a confusion matrix."""
    total = cm.sum()
    out: dict[str, list[float]] = {k: [] for k in ("sensitivity", "specificity", "ppv", "npv", "f1")}
    for c in range(cm.shape[0]):
        tp = cm[c, c]
        fn = cm[c].sum() - tp
        fp = cm[:, c].sum() - tp
        tn = total - tp - fn - fp
        sens, ppv = _div(tp, tp + fn), _div(tp, tp + fp)
        out["sensitivity"].append(sens)
        out["specificity"].append(_div(tn, tn + fp))
        out["ppv"].append(ppv)
        out["npv"].append(_div(tn, tn + fn))
        out["f1"].append(_div(2 * tp, 2 * tp + fp + fn))
    return out


def _auc(y_bin: np.ndarray, score: np.ndarray, fn) -> float:
    if y_bin.min() == y_bin.max():
        return math.nan  # one class only: undefined
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        return float(fn(y_bin, score))


def compute_metrics(y: np.ndarray, probs: np.ndarray) -> dict:
    """Point estimates: accuracy, confusion matrix, per-class and macro metrics."""
    y = np.asarray(y, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    n, c = probs.shape
    pred = probs.argmax(1)
    cm = confusion_matrix(y, pred, c)
    per = metrics_from_confusion(cm)
    per["auroc"] = [_auc((y == k).astype(int), probs[:, k], roc_auc_score) for k in range(c)]
    per["auprc"] = [_auc((y == k).astype(int), probs[:, k], average_precision_score) for k in range(c)]
    macro = {k: _nanmean(v) for k, v in per.items()}
    return {
        "n": int(n),
        "accuracy": float((pred == y).mean()) if n else math.nan,
        "confusion": cm.tolist(),
        "per_class": per,
        "macro": macro,
        "support": np.bincount(y, minlength=c).tolist(),
    }


def _nanmean(values) -> float:
    arr = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else math.nan


def _flatten(m: dict) -> dict[str, float]:
    flat = {"accuracy": m["accuracy"]}
    for k, vals in m["per_class"].items():
        for c, v in enumerate(vals):
            flat[f"{k}/{c}"] = v
    for k, v in m["macro"].items():
        flat[f"macro_{k}"] = v
    return flat


def bootstrap_ci(
    y, probs, groups=None, *, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0, progress: bool = False
) -> dict[str, tuple[float, float]]:
    """Percentile intervals for every metric of :func:`compute_metrics` (flattened keys).

    ``groups`` (length N): resample whole groups with replacement; else resample images.
    """
    y = np.asarray(y, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    units = resampling_units(groups, len(y))
    k = len(units)
    samples: dict[str, list[float]] = {}
    from tqdm.auto import tqdm

    for _ in tqdm(range(n_boot), desc="bootstrap", unit="resample", leave=False, disable=not progress):
        pick = rng.integers(0, k, k)
        idx = np.concatenate([units[j] for j in pick])
        for key, v in _flatten(compute_metrics(y[idx], probs[idx])).items():
            samples.setdefault(key, []).append(v)
    out = {}
    for key, vals in samples.items():
        arr = np.asarray(vals, dtype=np.float64)
        arr = arr[np.isfinite(arr)]
        out[key] = (
            (float(np.quantile(arr, alpha / 2)), float(np.quantile(arr, 1 - alpha / 2))) if len(arr) else (math.nan, math.nan)
        )
    return out


def expected_calibration_error(y, probs, n_bins: int = 15) -> tuple[float, dict]:
    """ECE of the top-class confidence over equal-width bins; returns ``(ece, reliability table)``."""
    y = np.asarray(y, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    conf = probs.max(1)
    correct = (probs.argmax(1) == y).astype(np.float64)
    edges = np.linspace(0, 1, n_bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    table = {"bin_lower": edges[:-1].tolist(), "bin_upper": edges[1:].tolist(), "count": [], "confidence": [], "accuracy": []}
    ece = 0.0
    for b in range(n_bins):
        mask = which == b
        cnt = int(mask.sum())
        table["count"].append(cnt)
        table["confidence"].append(float(conf[mask].mean()) if cnt else math.nan)
        table["accuracy"].append(float(correct[mask].mean()) if cnt else math.nan)
        if cnt:
            ece += cnt / len(y) * abs(conf[mask].mean() - correct[mask].mean())
    return float(ece), table


def wilson_interval(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n`` (nan, nan when ``n`` is 0)."""
    if n <= 0:
        return (math.nan, math.nan)
    from scipy.stats import norm

    z = float(norm.ppf(1 - alpha / 2))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if k == 0 else lo, 1.0 if k == n else hi)  # exact ends (no 0.9999999 above an observed 1.0)


#: the operating points :func:`operating_points` reports: (what is fixed, its target)
OPERATING_POINTS = (("specificity", 0.90), ("specificity", 0.95), ("sensitivity", 0.90), ("sensitivity", 0.95))


def _points(y_pos: np.ndarray, score: np.ndarray) -> dict[str, float]:
    """Sensitivity at specificity >= 90 / 95% and specificity at sensitivity >= 90 / 95% (best over thresholds)."""
    pos, neg = score[y_pos], score[~y_pos]
    if len(pos) == 0 or len(neg) == 0:
        return {f"{'sensitivity' if f == 'specificity' else 'specificity'}@{f}={t:g}": math.nan for f, t in OPERATING_POINTS}
    thresholds = np.unique(np.concatenate([score, [np.inf]]))
    pos_s, neg_s = np.sort(pos), np.sort(neg)
    # at threshold t (positive when score >= t): sensitivity = share of pos >= t, specificity = share of neg < t
    sens = 1 - np.searchsorted(pos_s, thresholds, side="left") / len(pos)
    spec = np.searchsorted(neg_s, thresholds, side="left") / len(neg)
    out = {}
    for fixed, target in OPERATING_POINTS:
        if fixed == "specificity":
            ok = spec >= target - 1e-12
            out[f"sensitivity@specificity={target:g}"] = float(sens[ok].max()) if ok.any() else math.nan
        else:
            ok = sens >= target - 1e-12
            out[f"specificity@sensitivity={target:g}"] = float(spec[ok].max()) if ok.any() else math.nan
    return out


def operating_points(y_pos, score, groups=None, *, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """For a positive class: sensitivity at 90% and 95% specificity and specificity at 90% and 95%
    sensitivity (the best the score achieves at that constraint), each ``{"value", "ci95"}`` with a
    percentile bootstrap interval over whole groups (patients) when ``groups`` is given."""
    y_pos, score = np.asarray(y_pos, dtype=bool), np.asarray(score, dtype=np.float64)
    point = _points(y_pos, score)
    units = resampling_units(groups, len(y_pos))
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(n_boot):
        idx = np.concatenate([units[j] for j in rng.integers(0, len(units), len(units))])
        for k, v in _points(y_pos[idx], score[idx]).items():
            samples[k].append(v)
    out = {}
    for k, v in point.items():
        arr = np.asarray(samples[k], dtype=np.float64)
        arr = arr[np.isfinite(arr)]
        ci = (float(np.quantile(arr, alpha / 2)), float(np.quantile(arr, 1 - alpha / 2))) if len(arr) else (math.nan, math.nan)
        out[k] = {"value": v, "ci95": list(ci)}
    return out


def resampling_units(groups, n: int) -> list[np.ndarray]:
    """Resampling units: one per group (patient), else one per image."""
    if groups is None:
        return [np.array([i]) for i in range(n)]
    _, inv = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    order = np.argsort(inv, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(inv[order])) + 1)

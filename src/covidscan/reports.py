"""Tables and figures: augmentation preview (paper Fig. 5), prediction grid (Fig. 8/9), report files.

Takes results (:class:`covidscan.results.EvaluationResult` and the per-image predictions);
computes nothing that :mod:`covidscan.evaluation` or :mod:`covidscan.metrics` own.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from covidscan.config import load_config  # noqa: E402
from covidscan.data import load_dataset, read_image  # noqa: E402
from covidscan.data.transforms import Preprocess, build_augment, to_gray_uint8  # noqa: E402
from covidscan.models import get_backbone  # noqa: E402
from covidscan.results import EvaluationResult, fmt_interval, write_json  # noqa: E402

logger = logging.getLogger(__name__)


def augment_preview(data, out, *, config=None, overrides=None, n: int = 4, seed: int = 0, task=None) -> Path:
    """Rows: one scan each; columns: the preprocessed original, then 5 training augmentations."""
    cfg = load_config(config, overrides or [])
    index = load_dataset(data, task or cfg.data.task if config else task)
    pre = Preprocess.from_config(get_backbone(cfg.model.backbone), cfg.data)
    aug = build_augment(cfg.augment, pre.image_size)
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(index), size=min(n, len(index)), replace=False)
    cols = 6
    fig, axes = plt.subplots(len(picks), cols, figsize=(2 * cols, 2 * len(picks)), squeeze=False)
    gen_state = torch.random.fork_rng()
    with gen_state:
        torch.manual_seed(seed)
        for r, i in enumerate(picks):
            rec = index.records[i]
            x = to_gray_uint8(read_image(rec.path), pre)
            for c in range(cols):
                img = x if c == 0 or aug is None else aug(x)
                ax = axes[r, c]
                ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=255)
                ax.set_xticks([])
                ax.set_yticks([])
                if c == 0:
                    ax.set_ylabel(rec.label, fontsize=9)
                if r == 0:
                    ax.set_title("original" if c == 0 else f"augmented {c}", fontsize=9)
    a = cfg.augment
    fig.suptitle(
        f"training augmentation: rotation ±{a.rotation:g}°, zoom ±{a.zoom:g}, shift ±{a.shift:g}, h-flip p={a.hflip:g}",
        fontsize=10,
    )
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def evaluation_markdown(r: EvaluationResult) -> str:
    names = r.class_names
    m, ci = r.metrics, r.ci95
    lines = [
        f"# Evaluation: {r.backbone} + {r.head} head ({r.task})",
        "",
        "> Research use only; not a medical device.",
        "",
        f"- checkpoint: `{r.checkpoint}`",
        f"- weights source: {r.weights_source}",
        f"- evaluated on: {r.evaluated_on}",
        f"- split type: {r.split_type} (model trained on a {r.trained_split_protocol} split)",
        f"- bootstrap: {r.bootstrap['resamples']} resamples of {r.bootstrap['unit']}s, 95% percentile intervals",
        "",
        "| class | images | patients/groups |",
        "|---|---:|---:|",
    ]
    for n in names:
        c = r.counts[n]
        lines.append(f"| {n} | {c['images']} | {c['patients'] if c['patients'] is not None else 'n/a'} |")
    if r.absent_classes:
        lines += [
            "",
            f"**Absent from this set:** {', '.join(r.absent_classes)}: their sensitivity and AUROC are "
            "undefined (n/a); they still count as wrong answers when predicted.",
        ]
    lines += [
        "",
        f"**Accuracy:** {fmt_interval(m['accuracy'], ci.get('accuracy'))} %  (n = {m['n']})   **ECE:** {r.ece:.3f}",
        "",
        "| class | sensitivity | specificity | PPV | NPV | F1 | AUROC | AUPRC |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = ("sensitivity", "specificity", "ppv", "npv", "f1", "auroc", "auprc")
    for c, n in enumerate(names):
        cells = [fmt_interval(m["per_class"][k][c], ci.get(f"{k}/{c}"), pct=k not in ("auroc", "auprc")) for k in keys]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    cells = [fmt_interval(m["macro"][k], ci.get(f"macro_{k}"), pct=k not in ("auroc", "auprc")) for k in keys]
    lines.append("| **macro** | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Sensitivity, specificity, PPV, NPV, F1 in %; AUROC / AUPRC one-vs-rest.",
        "",
        "Confusion matrix (rows: true, columns: predicted):",
        "",
        "| true \\ pred | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for n, row in zip(names, m["confusion"]):
        lines.append(f"| {n} | " + " | ".join(str(v) for v in row) + " |")
    if r.skipped:
        lines += ["", f"{len(r.skipped)} unreadable image(s) skipped:"] + [f"- {s['path']}: {s['reason']}" for s in r.skipped]
    figures = ["confusion.png", "roc.png", "reliability.png"] + (["grid.png"] if r.grid else [])
    lines += ["", "Per-image predictions: `predictions.csv`. Figures: " + ", ".join(f"`{f}`" for f in figures)]
    return "\n".join(lines) + "\n"


def write_predictions_csv(preds, names, path: Path) -> Path:
    """One row per image: file, true label, one probability per class, predicted label, group, source."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "label", *[f"p_{n}" for n in names], "predicted", "group", "source"])
        for rec, p in zip(preds.index.records, preds.probs):
            w.writerow([str(rec.path), rec.label, *(f"{v:.6f}" for v in p), names[int(p.argmax())], rec.group, rec.source])
    return path


def write_evaluation(result: EvaluationResult, preds, out: Path, *, grid: int = 0, seed: int = 0) -> None:
    """``metrics.json`` (strict JSON), ``report.md``, ``predictions.csv`` and the figures in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    names = result.class_names
    _plot_confusion(np.asarray(result.metrics["confusion"]), names, out / "confusion.png")
    _plot_roc(preds.y, preds.probs, names, out / "roc.png")
    _plot_reliability(result.reliability, result.ece, out / "reliability.png")
    if grid:
        prediction_grid(preds, names, out / "grid.png", n=grid, seed=seed)
        result.grid = "grid.png"
    write_predictions_csv(preds, names, out / "predictions.csv")
    write_json(result, out / "metrics.json")
    (out / "report.md").write_text(evaluation_markdown(result), encoding="utf-8")


def _plot_confusion(cm: np.ndarray, names, path: Path) -> None:
    """Counts and row-normalised (each true class sums to 100%) side by side."""
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm, dtype=float), where=rows > 0)
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 4))
    for ax, mat, title, fmt in ((axes[0], cm, "counts", "{:d}"), (axes[1], norm * 100, "% of the true class", "{:.0f}%")):
        ax.imshow(mat, cmap="Blues", vmin=0)
        for (i, j), v in np.ndenumerate(mat):
            ax.text(j, i, fmt.format(int(v) if fmt == "{:d}" else v), ha="center", va="center",
                    color="white" if v > mat.max() / 2 else "black")  # fmt: skip
        ax.set_xticks(range(len(names)), names)
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_roc(y, probs, names, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for c, n in enumerate(names):
        yb = (y == c).astype(int)
        if yb.min() == yb.max():
            continue
        fpr, tpr, _ = roc_curve(yb, probs[:, c])
        ax.plot(fpr, tpr, label=f"{n} (AUROC {roc_auc_score(yb, probs[:, c]):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_reliability(table: dict, ece: float, path: Path) -> None:
    """Accuracy per confidence bin with the number of images in each bin written above it; bins of
    fewer than 10 images drawn pale (their accuracy is noise)."""
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    lo, hi = np.asarray(table["bin_lower"]), np.asarray(table["bin_upper"])
    acc = np.asarray([np.nan if a is None else a for a in table["accuracy"]], dtype=float)
    count = np.asarray(table["count"], dtype=int)
    for few in (False, True):
        sel = np.isfinite(acc) & ((count < 10) == few)
        ax.bar(lo[sel], acc[sel], width=(hi - lo)[sel], align="edge", edgecolor="k", alpha=0.25 if few else 0.75,
               color="tab:blue", label="accuracy (< 10 images)" if few else "accuracy")  # fmt: skip
    for x, a, n in zip((lo + hi) / 2, acc, count):
        if n:
            ax.text(x, min(a, 0.93) + 0.02, str(n), ha="center", fontsize=6, rotation=90)
    ax.plot([0, 1], [0, 1], "r--", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy (numbers: images per bin)")
    ax.set_title(f"ECE = {ece:.3f}")
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_history(history: list[dict], path: Path) -> Path:
    """Training curves: loss and accuracy, train and validation, per epoch."""
    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, label in ((axes[0], "loss", "cross-entropy loss"), (axes[1], "acc", "accuracy")):
        ax.plot(ep, [h[f"train_{key}"] for h in history], "o-", label="train")
        ax.plot(ep, [h[f"val_{key}"] for h in history], "s-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def prediction_grid(preds, names, path: Path, *, n: int = 16, seed: int = 0) -> Path:
    """The paper's Fig. 8/9: n test scans with true and predicted label and probability; mistakes in red."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(preds.y), size=min(n, len(preds.y)), replace=False)
    cols = int(np.ceil(np.sqrt(len(picks))))
    rows = int(np.ceil(len(picks) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, picks):
        rec = preds.index.records[i]
        img = read_image(rec.path).pixels
        ax.imshow(img if img.ndim == 3 else img, cmap=None if img.ndim == 3 else "gray")
        p = preds.probs[i]
        k = int(p.argmax())
        wrong = k != preds.y[i]
        ax.set_title(
            f"true: {names[preds.y[i]]}\npred: {names[k]} ({p[k]:.2f})" + ("  ✗" if wrong else ""),
            fontsize=8,
            color="red" if wrong else "black",
        )
        if wrong:
            for s in ax.spines.values():
                s.set_edgecolor("red")
                s.set_linewidth(3)
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

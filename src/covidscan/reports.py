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
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from covidscan.data import read_image  # noqa: E402
from covidscan.results import EvaluationResult, fmt_interval, write_json  # noqa: E402

logger = logging.getLogger(__name__)


def subgroup_markdown(field: str, rows: list[dict], threshold: dict | None) -> list[str]:
    """The table of ``covidscan evaluate --by FIELD``: one row per value (point estimates, no intervals)."""

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}"

    at = f" at the stored threshold {threshold['value']:.3f}" if threshold else ""
    head = "| " + field + " | images | COVID | accuracy % | COVID sens. % | COVID spec. % | COVID AUROC |"
    head += f" sens. / spec. %{at} |" if threshold else ""
    lines = ["", f"Subgroups by {field} (at argmax unless stated; small groups vary a lot):", "", head]
    lines.append("|---" * (head.count("|") - 1) + "|")
    for row in rows:
        auc = "n/a" if row["covid_auroc"] is None else f"{row['covid_auroc']:.3f}"
        cells = [row["value"], row["images"], row["covid"], pct(row["accuracy"]), pct(row["covid_sensitivity"])]
        cells += [pct(row["covid_specificity"]), auc]
        if threshold:
            cells.append(f"{pct(row.get('threshold_sensitivity'))} / {pct(row.get('threshold_specificity'))}")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def _overlap_text(r: EvaluationResult) -> str:
    """The overlap line of a report: what of the evaluated set the model trained or validated on."""
    ov = r.overlap
    if ov is None:
        return "not checked"
    if not ov.get("checked"):
        return ov["summary"]
    if ov["external"]:
        return ov["summary"]
    return "**" + ov["summary"] + "**: these figures overstate what the model does on new scans"


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
        f"- seen in training: {_overlap_text(r)}",
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
    if r.operating_points:
        lines += [
            "",
            "COVID operating points (the best each constraint allows over all thresholds; 95% bootstrap intervals):",
            "",
        ]
        lines += ["| at | value |", "|---|---|"]
        for key, v in r.operating_points.items():
            what, _, at = key.partition("@")
            fixed, _, target = at.partition("=")
            lines.append(f"| {fixed} >= {float(target):.0%} | {what} {fmt_interval(v['value'], v['ci95'])} % |")
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
    for field, rows in r.extra.get("subgroups", {}).items():
        lines += subgroup_markdown(field, rows, r.threshold)
    if r.skipped:
        lines += ["", f"{len(r.skipped)} unreadable image(s) skipped:"] + [f"- {s['path']}: {s['reason']}" for s in r.skipped]
    figures = [("confusion matrix", "confusion.png"), ("ROC", "roc.png"), ("reliability", "reliability.png")]
    figures += [("test scans, mistakes first", "grid.png")] if r.grid else []
    lines += ["", "Per-image predictions: `predictions.csv`; the same report with the figures inside: `report.html`.", ""]
    lines += [f"![{alt}]({f})" for alt, f in figures]
    return "\n".join(lines) + "\n"


def write_predictions_csv(preds, names, path: Path) -> Path:
    """One row per image: file, true label, one probability per class, predicted label, group, source and
    ``seen`` (train / val / near-train / near-val when the model trained or validated on it, else empty)."""
    seen = preds.seen or [""] * len(preds.probs)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "label", *[f"p_{n}" for n in names], "predicted", "group", "source", "seen"])
        for rec, p, s in zip(preds.index.records, preds.probs, seen):
            w.writerow([str(rec.path), rec.label, *(f"{v:.6f}" for v in p), names[int(p.argmax())], rec.group, rec.source, s])
    return path


def write_evaluation(
    result: EvaluationResult, preds, out: Path, *, grid: int = 0, seed: int = 0, errors_first: bool = True
) -> None:
    """``metrics.json`` (strict JSON), ``report.md``, ``report.html`` (self-contained), ``predictions.csv`` and
    the figures in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    names = result.class_names
    _plot_confusion(np.asarray(result.metrics["confusion"]), names, out / "confusion.png")
    _plot_roc(preds.y, preds.probs, names, out / "roc.png")
    _plot_reliability(result.reliability, result.ece, out / "reliability.png")
    if grid:
        prediction_grid(preds, names, out / "grid.png", n=grid, seed=seed, errors_first=errors_first)
        result.grid = "grid.png"
    write_predictions_csv(preds, names, out / "predictions.csv")
    write_json(result, out / "metrics.json")
    md = evaluation_markdown(result)
    (out / "report.md").write_text(md, encoding="utf-8")
    (out / "report.html").write_text(
        report_html(md, out, title=f"covidscan evaluation: {result.backbone} ({result.task})"), encoding="utf-8"
    )


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


def roc_band(yb: np.ndarray, score: np.ndarray, *, n_boot: int = 200, seed: int = 0, grid=None):
    """``(fpr_grid, lo, hi)``: pointwise 95% bootstrap band of the ROC curve (images resampled, sensitivity
    interpolated on a fixed 1 - specificity grid); None when a resample cannot hold both classes."""
    grid = np.linspace(0, 1, 101) if grid is None else grid
    rng = np.random.default_rng(seed)
    curves = []
    for _ in range(n_boot):
        i = rng.integers(0, len(yb), len(yb))
        if yb[i].min() == yb[i].max():
            continue
        fpr, tpr, _ = roc_curve(yb[i], score[i])
        curves.append(np.interp(grid, fpr, tpr))
    if len(curves) < n_boot // 2:
        return None
    lo, hi = np.percentile(np.asarray(curves), [2.5, 97.5], axis=0)
    return grid, lo, hi


def _plot_roc(y, probs, names, path: Path, *, n_boot: int = 200) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for c, n in enumerate(names):
        yb = (y == c).astype(int)
        if yb.min() == yb.max():
            continue
        fpr, tpr, _ = roc_curve(yb, probs[:, c])
        (line,) = ax.plot(fpr, tpr, label=f"{n} (AUROC {roc_auc_score(yb, probs[:, c]):.3f})")
        band = roc_band(yb, probs[:, c], n_boot=n_boot, seed=c) if n_boot else None
        if band is not None:
            ax.fill_between(band[0], band[1], band[2], color=line.get_color(), alpha=0.15, lw=0)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("ROC, shaded: 95% bootstrap band", fontsize=9)
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


def plot_history(history: list[dict], path: Path, *, chosen: int | None = None) -> Path:
    """Training curves: loss and accuracy, train and validation, per epoch (whole epochs on the axis), the
    epoch whose weights were kept (``chosen``, by validation loss) marked."""
    from matplotlib.ticker import MaxNLocator

    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, label in ((axes[0], "loss", "cross-entropy loss"), (axes[1], "acc", "accuracy")):
        ax.plot(ep, [h[f"train_{key}"] for h in history], "o-", label="train")
        ax.plot(ep, [h[f"val_{key}"] for h in history], "s-", label="validation")
        if chosen is not None and chosen in ep:
            ax.axvline(chosen, color="0.4", linestyle=":", linewidth=1)
            ax.plot([chosen], [history[ep.index(chosen)][f"val_{key}"]], "*", color="crimson", markersize=12,
                    label=f"kept: epoch {chosen}")  # fmt: skip
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def grid_picks(y, probs, n: int, *, errors_first: bool = True, seed: int = 0) -> np.ndarray:
    """Which scans the grid shows: every mistake first (most confident first, up to ``n``), then correct scans
    at random; ``errors_first=False`` draws all ``n`` at random (the paper's figure)."""
    rng = np.random.default_rng(seed)
    n = min(n, len(y))
    if not errors_first:
        return rng.choice(len(y), size=n, replace=False)
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != y)
    wrong = wrong[np.argsort(-probs[wrong, pred[wrong]], kind="stable")][:n]
    right = np.flatnonzero(pred == y)
    fill = rng.choice(right, size=min(n - len(wrong), len(right)), replace=False) if n > len(wrong) else np.array([], int)
    return np.concatenate([wrong, fill]).astype(int)


def prediction_grid(preds, names, path: Path, *, n: int = 16, seed: int = 0, errors_first: bool = True) -> Path:
    """The paper's Fig. 8/9: n test scans with file name, true and predicted label and probability; mistakes
    (shown first unless ``errors_first=False``) in red."""
    picks = grid_picks(np.asarray(preds.y), np.asarray(preds.probs), n, errors_first=errors_first, seed=seed)
    cols = int(np.ceil(np.sqrt(len(picks))))
    rows = int(np.ceil(len(picks) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, picks):
        rec = preds.index.records[i]
        packed = preds.index.packed
        img = packed.read(rec.packed_row) if packed is not None else read_image(rec.path).pixels
        ax.imshow(img if img.ndim == 3 else img, cmap=None if img.ndim == 3 else "gray")
        p = preds.probs[i]
        k = int(p.argmax())
        wrong = k != preds.y[i]
        fname = Path(rec.path).name
        fname = fname if len(fname) <= 28 else fname[:12] + "..." + fname[-13:]
        ax.set_title(
            f"{fname}\ntrue: {names[preds.y[i]]}\npred: {names[k]} ({p[k]:.2f})" + ("  ✗" if wrong else ""),
            fontsize=7,
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


def report_html(text: str, folder: Path, *, title: str = "covidscan report") -> str:
    """One self-contained HTML file from a report's markdown (Python-Markdown with tables), its
    ``![alt](figure.png)`` figures embedded as base64 images, to send to a colleague as one file. Wide tables
    scroll inside their own box, so the page itself never scrolls sideways on a phone."""
    import base64
    import html as _html
    import re

    import markdown

    def embed(m: re.Match) -> str:
        png = Path(folder) / m.group(2)
        if not (png.is_file() and png.suffix == ".png"):
            return ""
        data = base64.b64encode(png.read_bytes()).decode()
        return f'<figure><img alt="{_html.escape(m.group(1))}" src="data:image/png;base64,{data}"><figcaption>{_html.escape(m.group(1))}</figcaption></figure>'

    text = text.replace("; the same report with the figures inside: `report.html`", "")  # this file is that report
    text = _html.escape(text, quote=False)  # file names and class names are text, never markup (Markdown passes HTML)
    text = re.sub(r"^!\[([^\]]*)\]\(([^)]+)\)$", embed, text, flags=re.M)
    body = markdown.markdown(text, extensions=["tables"], output_format="html")
    body = body.replace("<table>", '<div class="scroll"><table>').replace("</table>", "</table></div>")
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;overflow-wrap:anywhere}"
        ".scroll{overflow-x:auto;max-width:100%}table{border-collapse:collapse;margin:.6em 0}"
        "td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left;overflow-wrap:normal}"
        "img{max-width:100%}figure{margin:1em 0}blockquote{background:#fff3cd;margin:0;padding:.5em}"
    )
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
        f'content="width=device-width, initial-scale=1"><title>{_html.escape(title)}</title><style>{style}</style>'
        f"</head><body>{body}</body></html>\n"
    )

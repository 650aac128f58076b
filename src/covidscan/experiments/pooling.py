"""Pooling leave-source-out runs: one place that reads fold folders and turns them into the figures every
results table quotes (``covidscan loso-report``).

Given one or more ``covidscan loso`` output folders with the same folds (several = an ensemble: the members'
COVID probabilities of each held-out image are averaged):

* per fold and pooled: COVID AUROC with a 95% group-bootstrap interval, and the plain mean of the folds'
  AUROCs (each held-out source counted once, where the pooled figure weighs them by size);
* per fold: specificity on each held-out non-COVID class at the threshold that gives 95% COVID sensitivity
  on the *other* folds' held-out COVID images (a threshold fixed before the new site is seen), optionally per
  value of a manifest field (``by="view"``: the projection; ``by="patient_id"``: each held-out CT patient);
  with ``by``, also per fold the AUROC of its COVID images against each value's non-COVID images (which
  patient or view the model takes for COVID; shown for a one-fold run too, which has no threshold to carry);
* ``val_threshold``: the threshold a model could ship with (95% sensitivity on its own validation split),
  applied unchanged to the held-out images (validation scores cached in ``fold/val_predictions.csv``);
* ``site``: what BatchNorm re-estimation on the held-out images (no labels) and a threshold chosen on 20% of
  them (whole groups) do on the rest (one run only).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from covidscan.labels import POSITIVE_CLASS
from covidscan.metrics import bootstrap_ci, compute_metrics
from covidscan.results import fmt_interval

PREDICTION_FIELDS = ("file", "label", "group", "p_covid")


def source_mean(aurocs) -> dict:
    """The plain mean of per-fold AUROCs over the folds that have one (both classes held out): each source
    counted once, where the pooled AUROC weighs sources by their size and one large source can decide it."""
    two_class = [float(a) for a in aurocs if a is not None and np.isfinite(a)]
    return {"auroc": float(np.mean(two_class)) if two_class else float("nan"), "folds": len(two_class)}


def read_scores(path: Path) -> dict[str, dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return {r["file"]: r for r in csv.DictReader(fh)}


def write_scores(path: Path, records, p_covid) -> None:
    """``records``' COVID probabilities in the ``predictions.csv`` format, written atomically (a report killed
    half-way leaves no half-written cache)."""
    import io

    from covidscan.results import atomic_write

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(PREDICTION_FIELDS), lineterminator="\n")
    w.writeheader()
    w.writerows({"file": str(r.path), "label": r.label, "group": r.group, "p_covid": float(q)} for r, q in zip(records, p_covid))
    atomic_write(path, buf.getvalue())


def auroc_ci(y: np.ndarray, p: np.ndarray, groups: list[str], n_boot: int = 500) -> tuple[float, list]:
    probs = np.stack([1 - p, p], 1)
    auc = compute_metrics(y, probs)["per_class"]["auroc"][1]
    return auc, list(bootstrap_ci(y, probs, groups, n_boot=n_boot)["auroc/1"]) if n_boot else [float("nan")] * 2


@dataclass
class Fold:
    """One fold's held-out images with the members' mean COVID probability."""

    name: str
    files: list[str]
    labels: np.ndarray
    p: np.ndarray
    groups: list[str]
    values: list[str] = field(default_factory=list)  # the ``by`` field per image

    @property
    def y(self) -> np.ndarray:
        return (self.labels == POSITIVE_CLASS).astype(int)


def read_folds(runs: list[Path], field_of: dict[str, str] | None = None, predictions: str = "predictions.csv") -> list[Fold]:
    """The folds shared by ``runs`` (``fold*/predictions.csv``, or another scores file of the same format such
    as :func:`adapted_file`), members' probabilities averaged per image."""
    folds = []
    for name in sorted(p.parent.name for p in Path(runs[0]).glob(f"fold*/{predictions}")):
        members = [read_scores(Path(run) / name / predictions) for run in runs]
        files = sorted(members[0])
        if any(set(m) != set(files) for m in members):
            raise ValueError(f"{name}: the runs hold out different images; they are not runs of the same folds")
        rows = [members[0][f] for f in files]
        p = np.mean([[float(m[f]["p_covid"]) for f in files] for m in members], axis=0)
        values = [(field_of or {}).get(str(Path(f).resolve()), "?") for f in files]
        folds.append(Fold(name, files, np.asarray([r["label"] for r in rows]), p, [f"{name}|{r['group']}" for r in rows], values))
    return folds


def threshold_for_sensitivity_of(p_pos: np.ndarray, sensitivity: float = 0.95) -> float:
    from covidscan.adapt import threshold_for_sensitivity

    return threshold_for_sensitivity(np.ones(len(p_pos), bool), p_pos, sensitivity)["value"]


def against_covid(f: Fold, negatives: np.ndarray) -> float:
    """AUROC of fold ``f``'s COVID images against the non-COVID images selected by ``negatives``: which kind of
    non-COVID image (a patient, a view, a disease) a model confuses with COVID, where the fold's AUROC mixes them."""
    keep = (f.y == 1) | negatives
    return float(auroc_ci(f.y[keep], f.p[keep], [], n_boot=0)[0])


def pool(runs: list[Path], *, by: str = "", data=None, n_boot: int = 500, predictions: str = "predictions.csv") -> dict:
    """AUROC per fold and pooled, and the cross-fold fixed-threshold specificity (see the module docstring);
    ``predictions``: which scores file of each fold (``adapted_file()``: after BatchNorm adaptation)."""
    field_of = {}
    if by:
        from covidscan.data import load_dataset

        field_of = {str(r.path): r.attribute(by) or "?" for r in load_dataset(data, task="xray").records}
    folds = read_folds(runs, field_of, predictions)
    if not folds:
        raise ValueError(f"{runs[0]}: no fold*/{predictions}")
    out = {"runs": [str(r) for r in runs], "by": by, "folds": [], "fixed_threshold": []}
    for f in folds:
        auc, ci = auroc_ci(f.y, f.p, f.groups, n_boot) if f.y.min() != f.y.max() else (float("nan"), [float("nan")] * 2)
        out["folds"].append({"fold": f.name, "n": len(f.y), "covid": int(f.y.sum()), "auroc": auc, "ci95": ci})
        if by and f.y.min() != f.y.max():  # how the fold's COVID images rank against each value's non-COVID images
            vals, neg = np.asarray(f.values), f.y == 0
            out["folds"][-1]["by_auroc"] = {v: against_covid(f, neg & (vals == v)) for v in sorted(set(vals[neg]))}
    y, p = np.concatenate([f.y for f in folds]), np.concatenate([f.p for f in folds])
    auc, ci = auroc_ci(y, p, sum((f.groups for f in folds), []), n_boot)
    out["pooled"] = {"n": len(y), "covid": int(y.sum()), "auroc": auc, "ci95": ci}
    out["source_mean"] = source_mean(f["auroc"] for f in out["folds"])
    for f in folds:
        other = np.concatenate([g.p[g.y == 1] for g in folds if g is not f] or [np.empty(0)])  # one fold: none
        if not len(other):
            continue
        thr = threshold_for_sensitivity_of(other)
        for label in sorted(set(f.labels) - {POSITIVE_CLASS}):
            sel = f.labels == label
            row = {
                "fold": f.name,
                "label": label,
                "n": int(sel.sum()),
                "threshold": thr,
                "specificity": float((f.p[sel] < thr).mean()),
            }
            if by:
                vals = np.asarray(f.values)
                row["by"] = {v: float((f.p[sel & (vals == v)] < thr).mean()) for v in sorted(set(vals[sel]))}
            out["fixed_threshold"].append(row)
    return out


def val_scores(fold_dir: Path) -> dict[str, dict]:
    """COVID probability of every validation image of a fold (scored once with ``best.pt``, then read back)."""
    from covidscan.checkpoint import load_checkpoint, model_from_checkpoint
    from covidscan.data import read_split
    from covidscan.predict import predict_index

    cache = fold_dir / "val_predictions.csv"
    if not cache.is_file():
        model, meta = model_from_checkpoint(load_checkpoint(fold_dir / "best.pt"))
        preds = predict_index(model, meta, read_split(fold_dir / "split.csv").subset("val"))
        pos = list(meta.class_names).index(POSITIVE_CLASS)
        write_scores(cache, preds.index.records, preds.probs[:, pos])
    return read_scores(cache)


def val_threshold(runs: list[Path], sensitivity: float = 0.95) -> list[dict]:
    """Per fold: the threshold for ``sensitivity`` on the fold's own validation split (the runs' mean), and the
    held-out sensitivity / specificity per class at it.

    Raises:
        ValueError: the runs' validation splits differ (trained on different data: no shared threshold).
    """
    rows = []
    for f in read_folds(runs):
        vals = [val_scores(Path(run) / f.name) for run in runs]
        if any(set(v) != set(vals[0]) for v in vals):
            raise ValueError(f"{f.name}: the runs' validation splits differ (trained on different data); no ensemble threshold")
        files = sorted(vals[0])
        vy = np.asarray([vals[0][x]["label"] == POSITIVE_CLASS for x in files])
        vp = np.mean([[float(v[x]["p_covid"]) for x in files] for v in vals], 0)
        from covidscan.adapt import threshold_for_sensitivity

        t = threshold_for_sensitivity(vy, vp, sensitivity)["value"]
        per = {label: float((f.p[f.labels == label] >= t).mean() if label == POSITIVE_CLASS else (f.p[f.labels == label] < t).mean())
               for label in sorted(set(f.labels))}  # fmt: skip
        rows.append({"fold": f.name, "threshold": t, "per_class": per, "val_specificity": float((vp[~vy] < t).mean())})
    return rows


def adapted_file(tta: bool = False) -> str:
    """Where a fold caches its held-out scores after BatchNorm re-estimation (with ``tta``: image + mirror)."""
    return "bn_adapted_tta_predictions.csv" if tta else "bn_adapted_predictions.csv"


def adapted_scores(fold_dir: Path, *, tta: bool = False) -> dict[str, dict]:
    """COVID probability of every held-out image of a fold after its ``best.pt`` re-estimated its BatchNorm
    statistics on those images (AdaBN, no labels: what ``covidscan adapt`` does with a new site's scans).
    Scored once, cached beside ``predictions.csv`` in the same format, then read back, so ``pool`` can pool
    adapted runs and ensembles of them."""
    from covidscan.adapt import adapt_batchnorm
    from covidscan.checkpoint import load_checkpoint, model_from_checkpoint
    from covidscan.data import read_split
    from covidscan.data.dataset import default_cache_dir, open_store
    from covidscan.predict import predict_index

    cache = Path(fold_dir) / adapted_file(tta)
    if not cache.is_file():
        test = read_split(Path(fold_dir) / "loso_split.csv").subset("test")
        model, meta = model_from_checkpoint(load_checkpoint(Path(fold_dir) / "best.pt"))
        store = open_store(test.records, meta.preprocess, packed=test.packed, cache_dir=default_cache_dir() / "images")
        adapt_batchnorm(model, store, device="cpu")
        preds = predict_index(model, meta, test, device="cpu", store=store, tta=tta)
        pos = list(meta.class_names).index(POSITIVE_CLASS)
        write_scores(cache, preds.index.records, preds.probs[:, pos])
    return read_scores(cache)


def pool_adapted(runs: list[Path], *, tta: bool = False, n_boot: int = 500) -> dict:
    """:func:`pool` of the runs' BatchNorm-adapted scores: every member adapted on each held-out source
    (:func:`adapted_scores`, cached), then averaged, as a site would adapt each model of an ensemble."""
    for run in runs:
        for fold in sorted(Path(run).glob("fold*/best.pt")):
            adapted_scores(fold.parent, tta=tta)
    return pool(runs, n_boot=n_boot, predictions=adapted_file(tta))


def site_adaptation(run: Path, *, calib: float = 0.2, seed: int = 0, tta: bool = False) -> list[dict]:
    """Per fold of one run: COVID AUROC as trained (with ``tta``: image + mirror), after BatchNorm re-estimation
    on the held-out images (no labels; :func:`adapted_scores`), and sensitivity / specificity on the held-out
    images outside a 20% labelled calibration part, at argmax and at the threshold chosen on that part for 95%
    sensitivity (not measurable, NaN, where that part holds no COVID or no non-COVID image)."""
    from covidscan.adapt import threshold_for_sensitivity
    from covidscan.checkpoint import load_checkpoint, model_from_checkpoint
    from covidscan.data import grouped_split, read_split
    from covidscan.predict import predict_index

    def binary(y, p):
        m = compute_metrics(np.asarray(y, int), np.stack([1 - p, p], 1))["per_class"]
        return {"auroc": m["auroc"][1], "sensitivity": m["sensitivity"][1], "specificity": m["specificity"][1]}

    rows = []
    for fold in sorted(p.parent for p in Path(run).glob("fold*/best.pt")):
        test = read_split(fold / "loso_split.csv").subset("test")
        if tta:
            model, meta = model_from_checkpoint(load_checkpoint(fold / "best.pt"))
            base = predict_index(model, meta, test, device="cpu", tta=True)
            pos = meta.class_names.index(POSITIVE_CLASS)
            scores = {str(r.path): float(q) for r, q in zip(base.index.records, base.probs[:, pos])}
        else:  # what training scored with best.pt, read back
            scores = {f: float(r["p_covid"]) for f, r in read_scores(fold / "predictions.csv").items()}
        adapted = adapted_scores(fold, tta=tta)
        test = test.subset([i for i, r in enumerate(test.records) if str(r.path) in scores and str(r.path) in adapted])
        files = [str(r.path) for r in test.records]  # the images both scorings could read
        y = np.asarray([r.label == POSITIVE_CLASS for r in test.records])
        p = np.asarray([scores[f] for f in files])
        pa = np.asarray([float(adapted[f]["p_covid"]) for f in files])
        parts = grouped_split(test, test=calib, val=0.0, seed=seed, by_source=True)
        cal = np.asarray([a == "test" for a in parts.assignment])
        rest_p, rest_y = p[~cal], y[~cal]
        if y[cal].all() or not y[cal].any():
            thr = {"threshold": float("nan"), "sensitivity": float("nan"), "specificity": float("nan")}
        else:
            t = threshold_for_sensitivity(y[cal], p[cal], 0.95)["value"]
            thr = {"threshold": t, "sensitivity": float((rest_p[rest_y] >= t).mean()) if rest_y.any() else float("nan"),
                   "specificity": float((rest_p[~rest_y] < t).mean()) if (~rest_y).any() else float("nan")}  # fmt: skip
        rows.append({
            "fold": fold.name, "n": int(len(y)), "as_trained": binary(y, p), "bn_adapted": binary(y, pa),
            "argmax_on_rest": binary(rest_y, rest_p), "site_threshold_on_rest": thr,
        })  # fmt: skip
    return rows


def report_markdown(r: dict, val: list[dict] | None = None, site: list[dict] | None = None, adapted: dict | None = None) -> str:
    """The tables of :func:`pool` (and of :func:`val_threshold` / :func:`site_adaptation` when given; ``adapted``:
    :func:`pool` of the BatchNorm-adapted scores)."""
    lines = [
        f"# Leave-source-out: {' + '.join(r['runs'])}",
        "",
        "| fold | images | COVID | COVID AUROC [95% CI] |",
        "|---|---:|---:|---|",
    ]
    for f in r["folds"]:
        lines.append(f"| {f['fold']} | {f['n']} | {f['covid']} | {fmt_interval(f['auroc'], f['ci95'], pct=False)} |")
    pl = r["pooled"]
    lines.append(f"| **pooled** | {pl['n']} | {pl['covid']} | **{fmt_interval(pl['auroc'], pl['ci95'], pct=False)}** |")
    sm = r.get("source_mean")
    if sm and sm["folds"] > 1:
        lines.append(f"| mean of the {sm['folds']} folds with both classes (each source counted once) | | | {sm['auroc']:.3f} |")
    ranked = [f for f in r["folds"] if f.get("by_auroc")]
    if ranked:
        lines += [
            "",
            f"AUROC of each fold's COVID images against the non-COVID images of each {r['by']} (below 0.5: ranked above COVID):",
            "",
        ]
        lines += [f"| fold | {r['by']}: AUROC |", "|---|---|"]
        lines += [f"| {f['fold']} | " + "; ".join(f"{k} {v:.3f}" for k, v in f["by_auroc"].items()) + " |" for f in ranked]
    if r["fixed_threshold"]:
        lines += [
            "",
            "Specificity on each fold's non-COVID images at the threshold giving 95% sensitivity on the other folds' COVID:",
            "",
        ]
        lines += [
            "| fold | class | images | threshold | specificity |" + (f" by {r['by']} |" if r["by"] else ""),
            "|---|---|---:|---:|---:|" + ("---|" if r["by"] else ""),
        ]
        for t in r["fixed_threshold"]:
            extra = " " + "; ".join(f"{k} {v:.0%}" for k, v in t.get("by", {}).items()) + " |" if r["by"] else ""
            lines.append(f"| {t['fold']} | {t['label']} | {t['n']} | {t['threshold']:.3f} | {t['specificity']:.1%} |{extra}")
    if val:
        lines += ["", "At the threshold for 95% sensitivity on each fold's own validation split:", ""]
        lines += ["| fold | threshold | held-out per class (COVID: sensitivity; others: specificity) |", "|---|---:|---|"]
        for v in val:
            lines.append(
                f"| {v['fold']} | {v['threshold']:.3f} | " + "; ".join(f"{k} {x:.1%}" for k, x in v["per_class"].items()) + " |"
            )
    if site:
        lines += ["", "Site adaptation (BatchNorm re-estimated on the held-out images; a threshold chosen on 20% of them):", ""]
        lines += ["| fold | n | AUROC as trained | AUROC BN-adapted | sens / spec at argmax (rest) | at site threshold (rest) |",
                  "|---|---:|---:|---:|---|---|"]  # fmt: skip
        for s in site:
            b, a, am, c = s["as_trained"], s["bn_adapted"], s["argmax_on_rest"], s["site_threshold_on_rest"]
            lines.append(f"| {s['fold']} | {s['n']} | {b['auroc']:.3f} | {a['auroc']:.3f} | {am['sensitivity']:.1%} / "
                         f"{am['specificity']:.1%} | {c['sensitivity']:.1%} / {c['specificity']:.1%} (t = {c['threshold']:.3f}) |")  # fmt: skip
        if any(not np.isfinite(s["site_threshold_on_rest"]["threshold"]) for s in site):
            lines += [
                "",
                "nan: the fold's 20% calibration part holds no COVID or no non-COVID image (whole groups), so no site threshold.",
            ]
    if adapted:
        pl, sm = adapted["pooled"], adapted["source_mean"]
        lines += ["", f"BatchNorm-adapted on each held-out source ({' + '.join(adapted['runs'])}):", ""]
        lines += ["| fold | COVID AUROC [95% CI] |", "|---|---|"]
        lines += [f"| {f['fold']} | {fmt_interval(f['auroc'], f['ci95'], pct=False)} |" for f in adapted["folds"]]
        lines.append(f"| **pooled** | **{fmt_interval(pl['auroc'], pl['ci95'], pct=False)}** |")
        if sm["folds"] > 1:
            lines.append(f"| mean of the {sm['folds']} folds with both classes | {sm['auroc']:.3f} |")
    return "\n".join(lines) + "\n"

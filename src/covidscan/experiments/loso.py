"""Leave-one-source-out (LOSO) evaluation: the honest estimate of performance on new hospitals.

For each source ``s`` (the ``source`` of each record: the manifest's column, else
``source_repo``, else the dataset folder's name) a model is trained on every other source
(validation carved from them, grouped) and scored on all images of ``s``. Groups that
reach into ``s`` (the same patient or a near-duplicate image elsewhere) are removed from
training, so nothing of ``s`` is seen. A left-out source often holds one class only (a
COVID-only collection), so per source we report what is defined there, and over all folds
the *pooled* COVID-vs-rest AUROC: every image scored by a model that never saw its source.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np

from covidscan.checkpoint import load_checkpoint, model_from_checkpoint
from covidscan.config import Config, load_config
from covidscan.data import Split, exclude_sources, grouped_split, load_dataset, write_split
from covidscan.errors import DataError
from covidscan.experiments.pooling import PREDICTION_FIELDS, source_mean
from covidscan.labels import POSITIVE_CLASS
from covidscan.metrics import bootstrap_ci, compute_metrics
from covidscan.predict import predict_index
from covidscan.results import fmt_interval, write_json
from covidscan.training import train

logger = logging.getLogger(__name__)


def source_key(source: str) -> str:
    """Collections are compared by the first word of their name, lower-cased, so that one
    collection named two ways (``ieee8023/covid-chestxray-dataset (fork ...)`` in one manifest,
    ``ieee8023 COVID-19 image data collection`` in another) is one source here."""
    words = source.replace("/", " ").split()
    return words[0].lower() if words else ""


def fold_sources(left_out: str) -> set[str]:
    """``"hannover+nih"`` -> ``{"hannover", "nih"}``: a fold may leave several sources out together
    (for example one COVID collection and one adult-normal collection, as a new hospital brings both)."""
    return {s.strip() for s in left_out.split("+") if s.strip()}


def held_key(record, field: str = "source") -> str:
    """What a fold holds out of ``record``: its :func:`source_key`, or with another ``field`` the same key of that
    manifest field's value (``patient_id``: one patient per fold; a record without the field is never held out)."""
    return source_key(record.source if field == "source" else record.attribute(field))


def loso_split(index, left_out: str, *, val: float, seed: int, field: str = "source") -> Split:
    """Test = every image of the source(s) ``left_out`` (:func:`source_key` names joined by ``+``; with
    ``field``, values of that manifest field, e.g. patients); train / val = the rest minus any group (patient,
    near-duplicate) that reaches into a left-out one."""
    out = fold_sources(left_out)
    held = [held_key(r, field) in out for r in index.records]
    touched = {r.group for r, h in zip(index.records, held) if h}
    rest = [i for i, r in enumerate(index.records) if not held[i] and r.group not in touched]
    inner = grouped_split(index.subset(rest), test=val, val=0.0, seed=seed)  # its "test" part is our validation
    assignment = ["drop"] * len(index)
    for k, i in enumerate(rest):
        assignment[i] = "val" if inner.assignment[k] == "test" else "train"
    for i in range(len(index)):
        if held[i]:
            assignment[i] = "test"
    keep = [i for i, a in enumerate(assignment) if a != "drop"]
    return Split(index.subset(keep), [assignment[i] for i in keep], f"loso:{left_out}")


def _finished_fold(fold_dir: Path, cfg: Config, left_out: str, field: str) -> tuple[dict, list[dict]] | None:
    """A fold's saved summary and predictions when it finished with ``cfg`` holding out ``left_out`` (values of
    ``field``); None when it has to be (re)run: missing, unreadable or truncated files, another config, or a
    folder that held another fold."""
    try:
        if load_config(fold_dir / "config.yaml").to_dict() != cfg.to_dict():
            return None
        fold = json.loads((fold_dir / "fold.json").read_text())["fold"]
        if fold.get("source") != left_out or fold.get("field", "source") != field:
            return None
        with open(fold_dir / "predictions.csv", newline="") as fh:
            rows = [{**r, "p_covid": float(r["p_covid"])} for r in csv.DictReader(fh)]
        if len(rows) != fold["n"]:
            return None
        return fold, rows
    except (OSError, ValueError, KeyError, TypeError):
        return None


def score_fold(
    fold_dir: Path, split: Split, source: str, *, n_boot: int = 500, weights_source: str = "", field: str = "source"
) -> tuple[dict, dict]:
    """Score ``fold_dir/best.pt`` on the left-out images of ``split``; write ``predictions.csv``
    (one row per image: file, label, group, COVID probability) and then ``fold.json`` (the
    fold's summary with 95% group-bootstrap intervals; its presence marks the fold finished).

    Returns the summary and the per-image rows."""
    model, meta = model_from_checkpoint(load_checkpoint(fold_dir / "best.pt"))
    preds = predict_index(model, meta, split.subset("test"))
    names = list(meta.class_names)
    pos = names.index(POSITIVE_CLASS)
    m = compute_metrics(preds.y, preds.probs)
    groups = [r.group for r in preds.index.records]
    ci = bootstrap_ci(preds.y, preds.probs, groups, n_boot=n_boot) if n_boot else {}
    fold = {
        "source": source,
        **({"field": field} if field != "source" else {}),
        "n": int(len(preds.y)),
        "trained_on": len(split.indices("train")),
        "classes": {n: int((preds.y == c).sum()) for c, n in enumerate(names)},
        "accuracy": m["accuracy"],
        "covid_auroc": m["per_class"]["auroc"][pos],
        "covid_sensitivity": m["per_class"]["sensitivity"][pos],
        "covid_specificity": m["per_class"]["specificity"][pos],
        "covid_auroc_ci": ci.get(f"auroc/{pos}"),
        "covid_sensitivity_ci": ci.get(f"sensitivity/{pos}"),
        "covid_specificity_ci": ci.get(f"specificity/{pos}"),
        "weights_source": weights_source or meta.weights_source,
    }
    rows = [
        {"file": str(r.path), "label": r.label, "group": g, "p_covid": float(p)}
        for r, g, p in zip(preds.index.records, groups, preds.probs[:, pos])
    ]
    with open(fold_dir / "predictions.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(PREDICTION_FIELDS))
        w.writeheader()
        w.writerows(rows)
    write_json({"fold": fold}, fold_dir / "fold.json", indent=1)
    return fold, rows


def leave_one_source_out(
    cfg: Config,
    data,
    out,
    *,
    sources=None,
    field: str = "source",
    n_boot: int = 500,
    progress: bool = False,
    resume: bool = False,
) -> dict:
    """Train and score one model per left-out source into ``out/foldNN``; pooled table in
    ``out/loso.json`` and ``out/loso.md``. ``resume=True`` keeps every fold that finished
    (its ``fold.json`` exists and was made with the same config), so an interrupted run
    continues where it stopped. ``field``: hold out values of another manifest field instead
    (``patient_id`` with ``sources=["p001", "cap001"]``: one patient per fold, the rest of
    their hospital kept in training)."""
    out = Path(out)
    index = exclude_sources(load_dataset(data, cfg.data.task), cfg.data.exclude)
    all_sources = sorted({held_key(r, field) for r in index.records} - {""})
    if len(all_sources) < 2:
        what = "sources" if field == "source" else f"values of {field!r}"
        raise DataError(f"leave-one-out needs at least two {what} (found {all_sources})")
    for s in sources or all_sources:  # every fold checked before any trains (a typo in the last one costs nothing)
        unknown = fold_sources(s) - set(all_sources)
        if unknown or not fold_sources(s):
            what = "source(s)" if field == "source" else f"{field} value(s)"
            raise DataError(f"unknown {what} {sorted(unknown) or s!r}; known: {all_sources} (join several with +)")
    out.mkdir(parents=True, exist_ok=True)
    folds, pooled_y, pooled_p, pooled_g = [], [], [], []
    for k, s in enumerate(sources or all_sources):
        split = loso_split(index, s, val=cfg.data.val or 0.1, seed=cfg.data.split_seed, field=field)
        fold_dir = out / f"fold{k:02d}"
        fold_dir.mkdir(exist_ok=True)
        finished = _finished_fold(fold_dir, cfg, s, field) if resume else None
        if finished:
            fold, rows = finished
            logger.info("LOSO %s: kept finished fold %s", s, fold_dir)
        else:
            write_split(split, fold_dir / "loso_split.csv")
            result = train(cfg, None, fold_dir, split_file=fold_dir / "loso_split.csv", progress=progress, overwrite=True)
            fold, rows = score_fold(fold_dir, split, s, n_boot=n_boot, weights_source=result.weights_source, field=field)
        folds.append(fold)
        pooled_y.append(np.asarray([r["label"] == POSITIVE_CLASS for r in rows], dtype=int))
        pooled_p.append(np.asarray([r["p_covid"] for r in rows], dtype=np.float64))
        pooled_g += [f"{s}|{r['group']}" for r in rows]
        logger.info("LOSO %s: %s", s, fold)
    y = np.concatenate(pooled_y)
    p = np.concatenate(pooled_p)
    probs2 = np.stack([1 - p, p], 1)
    pooled = compute_metrics(y, probs2)
    ci = bootstrap_ci(y, probs2, pooled_g, n_boot=n_boot) if n_boot else {}
    res = {
        "task": cfg.data.task,
        "field": field,
        "config": cfg.to_dict(),
        "folds": folds,
        "pooled": {
            "n": int(len(y)),
            "covid_auroc": pooled["per_class"]["auroc"][1],
            "covid_auroc_ci": ci.get("auroc/1"),
            "covid_sensitivity": pooled["per_class"]["sensitivity"][1],
            "covid_specificity": pooled["per_class"]["specificity"][1],
        },
    }
    write_json(res, out / "loso.json")
    (out / "loso.md").write_text(loso_markdown(res))
    return res


def _ci(fold: dict, key: str, pct: bool = True) -> str:
    """``value [lo, hi]`` when the fold has an interval (folds scored before intervals: value only)."""
    return fmt_interval(fold.get(key), fold.get(f"{key}_ci"), pct=pct)


def _training_options(config: dict) -> str:
    """Augmentation and training fields as ``key=value`` (what tells two recipes apart)."""
    keep = ("enabled", "crop_scale", "gamma", "blur", "sharpen", "jpeg", "noise", "brightness", "contrast")
    aug = [f"{k}={v}" for k, v in config.get("augment", {}).items() if k in keep]
    keep = ("epochs", "lr", "batch_size", "seed", "precise_bn", "swa_start", "mixup", "mixstyle", "adversary", "strata")
    train = [f"{k}={v}" for k, v in config.get("train", {}).items() if k in keep]
    excluded = config.get("data", {}).get("exclude")
    return "augment " + ", ".join(aug) + "; train " + ", ".join(train) + (f"; data exclude={excluded}" if excluded else "")


def loso_markdown(r: dict) -> str:
    lines = [
        "# Leave-one-source-out",
        "",
        f"Config: backbone {r['config']['model']['backbone']}, head {r['config']['model']['head']}, "
        f"weights {r['config']['model']['weights']}, sampler {r['config']['train']['sampler']}, "
        f"equalize {r['config']['data']['equalize']}, crop {r['config']['data']['crop']}, "
        f"lung crop {r['config']['data'].get('lung_crop', False)}, lung mask {r['config']['data'].get('lung_mask', False)}",
        "",
        f"Training options: {_training_options(r['config'])}",
        "",
        f"| left-out {r.get('field', 'source')} | images | classes | accuracy % | COVID AUROC [95% CI] | COVID sensitivity % [95% CI] | COVID specificity % [95% CI] |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for f in r["folds"]:
        cls = ", ".join(f"{k} {v}" for k, v in f["classes"].items() if v)
        lines.append(
            f"| {f['source']} | {f['n']} | {cls} | {fmt_interval(f['accuracy'])} | {_ci(f, 'covid_auroc', False)} | "
            f"{_ci(f, 'covid_sensitivity')} | {_ci(f, 'covid_specificity')} |"
        )
    p = r["pooled"]
    lines += [
        "",
        f"**Pooled out-of-{r.get('field', 'source')} COVID-vs-rest AUROC: {fmt_interval(p['covid_auroc'], p.get('covid_auroc_ci'), pct=False)}** "
        f"(n = {p['n']}; every image scored by a model that never saw its {r.get('field', 'source')}; 95% bootstrap over patient groups)",
        "",
    ]
    sm = source_mean(f.get("covid_auroc") for f in r["folds"])
    if sm["folds"] > 1:
        lines += [f"Mean of the {sm['folds']} held-out sources' COVID AUROCs, each source counted once: {sm['auroc']:.3f}", ""]
    return "\n".join(lines)

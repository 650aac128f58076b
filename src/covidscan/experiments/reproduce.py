"""``covidscan reproduce``: the paper's three models under its protocol and under a patient-grouped one.

Berrimi et al. (2021) Tables III (X-ray) and IV (CT) report accuracy on an image-level
80/20 split. This trains DenseNet121, InceptionV3 and New-DenseNet with the paper's recipe
(``configs/{task}_{model}.yaml``: Adam, lr 1e-4, 224 px) under both protocols, evaluates
each best-on-validation checkpoint on its test split, and writes ``table.md`` with the
paper's numbers beside ours, plus each run's full report.

Where ImageNet weights cannot be had (DenseNet offline), the run trains from scratch and
the table says so; nothing is substituted silently.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from covidscan.config import Config, apply_overrides, config_from_dict, load_config, replace_cfg
from covidscan.errors import WeightsUnavailableError
from covidscan.evaluation import evaluate
from covidscan.experiments.paper import PAPER_ACCURACY, PAPER_MODELS, PROTOCOLS
from covidscan.results import fmt_interval, write_json
from covidscan.training import train

logger = logging.getLogger(__name__)


def recipe(task: str, model: str, configs_dir: Path | None) -> Config:
    path = Path(configs_dir or "configs") / f"{task}_{model}.yaml"
    if path.is_file():
        return load_config(path)
    backbone, head = PAPER_MODELS[model]
    logger.info("%s not found; using the built-in paper recipe", path)
    return load_config(
        None,
        [f"name={task}_{model}", f"data.task={task}", "data.image_size=224", f"model.backbone={backbone}", f"model.head={head}"],
    )


def reproduce(
    task: str,
    data,
    out,
    *,
    epochs: int | None = None,
    early_stopping: int | None = None,
    configs_dir=None,
    models=tuple(PAPER_MODELS),
    protocols=PROTOCOLS,
    overrides=(),
    n_boot: int = 1000,
    grid: int = 16,
    progress: bool = False,
) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for protocol in protocols:
        for name in models:
            cfg = recipe(task, name, configs_dir)
            cfg = config_from_dict(apply_overrides(cfg.to_dict(), [f"data.protocol={protocol}", *overrides]))
            if epochs:
                cfg = replace_cfg(cfg, train={"epochs": epochs})
            if early_stopping is not None:
                cfg = replace_cfg(cfg, train={"early_stopping": early_stopping})
            run_dir = out / protocol / name
            logger.info("reproduce: %s / %s / %s -> %s", task, protocol, name, run_dir)
            t0 = time.perf_counter()
            cfg, result, note = _train_with_fallback(cfg, data, run_dir, progress)
            train_s = time.perf_counter() - t0
            ev = evaluate(
                result.best_checkpoint, split_file=run_dir / "split.csv", out=run_dir / "eval", grid=grid, n_boot=n_boot
            )
            rows.append(
                {**_row(task, name, protocol, cfg, result, ev, note, train_s), "report": str(run_dir / "eval" / "report.md")}
            )
            write_json({"task": task, "rows": rows}, out / "results.json")
    (out / "table.md").write_text(table_markdown(task, rows), encoding="utf-8")
    return {"task": task, "rows": rows}


def _train_with_fallback(cfg: Config, data, run_dir: Path, progress: bool):
    """Train; where ImageNet weights cannot be had (DenseNet offline), train from scratch and say so. (``train``
    seeds its own forked generator with ``train.seed``: nothing here touches the global one.)"""
    try:
        return cfg, train(cfg, data, run_dir, progress=progress, overwrite=True), ""
    except WeightsUnavailableError:  # raised while building the model, before any training
        if cfg.model.weights != "imagenet":
            raise
    cfg = replace_cfg(cfg, model={"weights": "none"})
    result = train(cfg, data, run_dir, progress=progress, overwrite=True)
    return cfg, result, "trained from scratch: no ImageNet weights available offline"


def _row(task: str, name: str, protocol: str, cfg: Config, result, ev, note: str, train_s: float) -> dict:
    """One line of Table III / IV: accuracy and COVID metrics with intervals, timing of the run."""
    m, ci = ev.metrics, ev.ci95
    covid = ev.class_names.index("covid")
    hist = result.history
    return {
        "model": name,
        "backbone": cfg.model.backbone,
        "head": cfg.model.head,
        "protocol": protocol,
        "split_type": ev.split_type if protocol == "grouped" else "image-level (paper)",
        "weights_source": result.weights_source,
        "note": note,
        "epochs_run": len(hist),
        "epochs_planned": cfg.train.epochs,
        "best_epoch": result.best_epoch,
        "accuracy": m["accuracy"],
        "accuracy_ci": ci.get("accuracy"),
        "paper_accuracy": PAPER_ACCURACY[task][name] / 100,
        "macro_auroc": m["macro"]["auroc"],
        "macro_auroc_ci": ci.get("macro_auroc"),
        "covid_sensitivity": m["per_class"]["sensitivity"][covid],
        "covid_sensitivity_ci": ci.get(f"sensitivity/{covid}"),
        "covid_specificity": m["per_class"]["specificity"][covid],
        "covid_specificity_ci": ci.get(f"specificity/{covid}"),
        "ece": ev.ece,
        "n_test": m["n"],
        "train_seconds": train_s,
        "epoch_seconds": [h["seconds"] for h in hist],
        "images_per_s": max((h["train_images_per_s"] for h in hist), default=float("nan")),
        "peak_gpu_mib": max((h.get("peak_gpu_mib", float("nan")) for h in hist), default=float("nan")),
    }


def _mean(values) -> float:
    return sum(values) / len(values) if values else float("nan")


def _p(v, ci=None) -> str:
    return fmt_interval(v, ci, digits=2)


def table_markdown(task: str, rows: list[dict]) -> str:
    title = {"xray": "Table III (X-ray, 3 classes)", "ct": "Table IV (CT, 2 classes)"}[task]
    lines = [
        f"# Berrimi et al. (2021) {title}, reproduced",
        "",
        "Accuracy on the test split of each protocol, with 95% bootstrap intervals (patients resampled on the "
        "grouped split where groups are known, images on the paper's split). The paper's split is image-level "
        "and leaks patients between train and test; the grouped split does not.",
        "",
        "| model | protocol | weights | epochs (best/run/planned) | accuracy % [95% CI] | paper % | macro AUROC % | "
        "COVID sensitivity % | COVID specificity % | ECE | train s | s / epoch | images/s | peak GPU MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        w = r["weights_source"] + (f" — {r['note']}" if r["note"] else "")
        lines.append(
            f"| {r['model']} ({r['backbone']}+{r['head']}) | {r['split_type']} | {w} | "
            f"{r['best_epoch']}/{r['epochs_run']}/{r['epochs_planned']} | {_p(r['accuracy'], r['accuracy_ci'])} | "
            f"{r['paper_accuracy'] * 100:.2f} | {_p(r['macro_auroc'], r['macro_auroc_ci'])} | "
            f"{_p(r['covid_sensitivity'], r['covid_sensitivity_ci'])} | {_p(r['covid_specificity'], r['covid_specificity_ci'])} | "
            f"{r['ece']:.3f} | {r['train_seconds']:.0f} | {_mean(r.get('epoch_seconds')):.1f} | "
            f"{r.get('images_per_s', float('nan')):.0f} | {fmt_interval(r.get('peak_gpu_mib'), pct=False, digits=0)} |"
        )
    lines += ["", "Per-class metrics of each run: see its `report.md` (listed in `results.json`)."]
    return "\n".join(lines) + "\n"

"""Model card (Mitchell et al. 2019) in markdown, from a checkpoint's metadata and, when given,
an evaluation's ``metrics.json`` and a probe result. Prose and tables, never raw dicts."""

from __future__ import annotations

import json
from pathlib import Path

from covidscan.checkpoint import CheckpointMeta, load_checkpoint
from covidscan.results import EvaluationResult, fmt_interval

#: limits that hold for one task's models only
TASK_LIMITS = {
    "xray": [
        "- Portable AP films (bedside, supine) look like the COVID collections' films: expect false alarms on AP "
        "non-COVID films unless the threshold is set on your own scans (`covidscan calibrate`).",
    ],
    "ct": [
        "- CT: the largest public slice set has no patient ids, so slices of one patient can sit in train and test; "
        "transfer to other hospitals is unproven (see the leave-source-out figures).",
        "- A CT slice model scores slices; a patient's result is an aggregate of its lung slices (`covidscan predict` on a study).",
    ],
}


def _article(word: str) -> str:
    """'An' before a vowel sound (an efficientnet_lite0, an inception_v3), else 'A'."""
    return "An" if word[:1].lower() in "aeio" else "A"


def _counts_table(meta: CheckpointMeta) -> list[str]:
    counts = meta.train_counts or {}
    if not counts:
        return []
    names = list(meta.class_names)
    lines = ["| split | " + " | ".join(names) + " | groups |", "|---" * (len(names) + 2) + "|"]
    for split, c in counts.items():
        lines.append(f"| {split} | " + " | ".join(str(c.get(n, 0)) for n in names) + f" | {c.get('groups', '')} |")
    return lines


def _metrics_section(m: EvaluationResult) -> list[str]:
    mm, ci = m.metrics, m.ci95
    lines = [
        f"Evaluated on {m.evaluated_on} ({m.split_type}, n = {mm['n']}); 95% bootstrap intervals over "
        f"{m.bootstrap['unit']}s. Accuracy {fmt_interval(mm['accuracy'], ci.get('accuracy'))} %, expected "
        f"calibration error {m.ece:.3f}. Seen in training: "
        + (m.overlap["summary"] if m.overlap else "not checked (an evaluation made before covidscan 0.3)")
        + ".",
        "",
        "| class | sensitivity % | specificity % | PPV % | AUROC |",
        "|---|---|---|---|---|",
    ]
    pc = mm["per_class"]
    for c, n in enumerate(m.class_names):
        lines.append(
            f"| {n} | {fmt_interval(pc['sensitivity'][c], ci.get(f'sensitivity/{c}'))} | "
            f"{fmt_interval(pc['specificity'][c], ci.get(f'specificity/{c}'))} | {fmt_interval(pc['ppv'][c], ci.get(f'ppv/{c}'))} | "
            f"{fmt_interval(pc['auroc'][c], ci.get(f'auroc/{c}'), pct=False)} |"
        )
    return lines


def _model_section(meta: CheckpointMeta) -> list[str]:
    train_cfg = meta.config.get("train", {})
    pre = meta.preprocess
    versions = ", ".join(f"{k} {v}" for k, v in meta.versions.items())
    text = (
        f"{_article(meta.backbone)} `{meta.backbone}` backbone with a `{meta.head}` head, initialised from {meta.weights_source}. "
        f"Input: {pre.image_size} px square, grayscale copied to 3 channels, normalised with mean {list(pre.mean)} and "
        f"std {list(pre.std)}"
        + (", histogram-equalised" if pre.equalize else "")
        + (f", {pre.crop:.0%} border crop" if pre.crop else "")
        + (", cropped to the lung fields" if pre.lung_crop else "")
        + (", black outside the lung fields" if pre.lung_mask else "")
        + (", each slice cropped to the body" if pre.body_crop else "")
        + (f", learned lung mask option {pre.lungs!r}" if pre.lungs != "none" else "")
        + f". Trained with Adam (learning rate {train_cfg.get('lr')}) for up to {train_cfg.get('epochs')} epochs; "
        + (
            f"the checkpoint is the average of the weights over the last {meta.val_metrics['averaged_steps']} optimizer "
            f"steps (from epoch {train_cfg.get('swa_start')} to {meta.epoch}), BatchNorm statistics re-estimated for it. "
            if meta.val_metrics.get("averaged_steps")
            else f"the checkpoint is epoch {meta.epoch}, chosen on validation {train_cfg.get('monitor')}. "
        )
        + f"Library versions: {versions}."
    )
    if meta.members:
        text = (
            f"An ensemble: the mean of {len(meta.members)} models' probabilities ("
            + ", ".join(
                f"{m['backbone']}/{m['head']} at {m.get('image_size', pre.image_size)} px from {m['checkpoint']}"
                for m in meta.members
            )
            + f"). Shared input: {pre.image_size} px (resized inside for a member trained at a smaller size), "
            f"normalised with mean {list(pre.mean)} and std {list(pre.std)}."
        )
    lines = ["## Model", text]
    if meta.threshold:
        t = meta.threshold
        target = (
            f" (chosen for sensitivity {t['target_sensitivity']:.0%} on {t.get('data', 'local data')})"
            if "target_sensitivity" in t
            else ""
        )
        lines += ["", f"Operating threshold: {t['class']} is reported positive at probability >= {t['value']:.3f}{target}."]
    return lines


def _data_section(meta: CheckpointMeta) -> list[str]:
    lines = [
        "## Training data",
        f"From {', '.join(meta.data_origins) or 'unknown'} (data fingerprint `{meta.data_fingerprint[:16]}`), split "
        f"{meta.split_protocol} with grouping by {meta.grouping}. Images per split:",
        "",
        *_counts_table(meta),
    ]
    if meta.class_sources:
        lines += ["", "| class | sources (images) |", "|---|---|"]
        for label, srcs in meta.class_sources.items():
            lines.append(f"| {label} | " + "; ".join(f"{s} ({n})" for s, n in srcs.items()) + " |")
        single = [label for label, srcs in meta.class_sources.items() if len(srcs) == 1]
        if single:
            lines += [
                "",
                f"**Caveat:** class(es) {', '.join(single)} come from a single source each: the model can "
                "separate classes by source (hospital, age, markers, resolution) without learning disease.",
            ]
    return lines


def _record_line(record: dict | None) -> str:
    if record is None:
        return "The checkpoint holds no record of its training images (made before covidscan 0.3): overlap of new data with them cannot be checked."
    n_train, n_val = int((record["subset"] == 0).sum()), int((record["subset"] == 1).sum())
    return (
        f"The checkpoint records fingerprints of its {n_train} training and {n_val} validation images (pixel hash and "
        "32 x 32 thumbnail), so `evaluate`, `calibrate`, `adapt` and `probe` say how many of the images they are given it has seen."
    )


def model_card(checkpoint, *, metrics: Path | None = None, probe: Path | None = None) -> str:
    obj = load_checkpoint(checkpoint)
    meta: CheckpointMeta = obj["meta"]
    names = meta.class_names
    scans = "single frontal chest X-rays" if meta.task == "xray" else "single axial chest CT slices"
    lines = [
        f"# Model card: {meta.backbone} + {meta.head} head, {meta.task} ({', '.join(names)})",
        "",
        "> **Not for clinical use.** Research use only; covidscan is not a medical device. Do not use this model "
        "for diagnosis, triage or any decision about a patient.",
        "",
        "## Intended use",
        f"Research on COVID-19 detection from {scans}: benchmarking, studying shortcut learning, teaching. "
        "Not for screening or diagnosis of patients.",
        "",
        *_model_section(meta),
        "",
        *_data_section(meta),
        "",
        _record_line(obj.get("provenance")),
    ]
    lines += ["", "## Metrics"]
    if metrics and Path(metrics).is_file():
        lines += _metrics_section(EvaluationResult.read(metrics))
    else:
        vm = meta.val_metrics
        lines.append(
            f"Validation only (run `covidscan evaluate` for test metrics with intervals): accuracy "
            f"{fmt_interval(vm.get('val_acc'), pct=False)}, loss {fmt_interval(vm.get('val_loss'), pct=False)}."
        )
    if probe and Path(probe).is_file():
        p = json.loads(Path(probe).read_text())
        lines += ["", "## Shortcut probe", p["verdict"]]
    lines += [
        "",
        "## Known limits",
        "- Public COVID-19 image collections mix hospitals, ages, views and devices; internal test accuracy "
        "overstates accuracy on scans from other hospitals. Validate on your own data (`covidscan evaluate --data`).",
        "- Labels come from the source collections (RT-PCR or publications) and were not re-read by radiologists.",
        *TASK_LIMITS.get(meta.task, []),
        "- Probabilities are calibrated only as far as the reported ECE shows, on data like the test set.",
        "",
    ]
    return "\n".join(lines)

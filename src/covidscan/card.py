"""Model card (Mitchell et al. 2019) in markdown, from a checkpoint's metadata and, when
given, an evaluation's ``metrics.json`` and a probe result."""

from __future__ import annotations

import json
from pathlib import Path

from covidscan.checkpoint import load_checkpoint


def model_card(checkpoint, *, metrics: Path | None = None, probe: Path | None = None) -> str:
    meta = load_checkpoint(checkpoint)["meta"]
    names = meta["class_names"]
    cfg = meta.get("config", {})
    scans = "single frontal chest X-rays" if meta["task"] == "xray" else "single axial chest CT slices"
    use = (
        f"Research on COVID-19 detection from {scans}: benchmarking, studying shortcut learning, teaching. "
        "Not for screening or diagnosis of patients."
    )
    lines = [
        f"# Model card: {meta['backbone']} + {meta['head']} head, {meta['task']} ({', '.join(names)})",
        "",
        "> **Not for clinical use.** Research use only; covidscan is not a medical device. Do not use this model "
        "for diagnosis, triage or any decision about a patient.",
        "",
        "## Intended use",
        use,
        "",
        "## Model",
        f"- backbone `{meta['backbone']}`, head `{meta['head']}`; weights initialised from: {meta.get('weights_source')}",
        f"- input: {meta['preprocess']['image_size']} px square, grayscale copied to 3 channels, normalised with "
        f"mean {meta['preprocess']['mean']} / std {meta['preprocess']['std']}",
        f"- training: Adam lr {cfg.get('train', {}).get('lr')}, up to {cfg.get('train', {}).get('epochs')} epochs, "
        f"best epoch {meta.get('epoch')} chosen on validation {cfg.get('train', {}).get('monitor')}",
        f"- library versions: {meta.get('versions')}",
        "",
        "## Training data",
        f"- from: {', '.join(meta.get('data_origins', [])) or 'unknown'}; data fingerprint `{meta.get('data_fingerprint', '')[:16]}`",
        f"- split: {meta.get('split_protocol')} (grouping by {meta.get('grouping')}); counts per split: {meta.get('train_counts')}",
    ]
    cs = meta.get("class_sources") or {}
    if cs:
        lines.append("- sources per class:")
        for label, srcs in cs.items():
            lines.append(f"  - {label}: " + "; ".join(f"{s} ({n})" for s, n in srcs.items()))
        single = [label for label, srcs in cs.items() if len(srcs) == 1]
        if single:
            lines.append(
                f"- **caveat:** class(es) {', '.join(single)} come from a single source each: the model can "
                "separate classes by source (hospital, age, markers, resolution) without learning disease."
            )
    lines += ["", "## Metrics"]
    if metrics and Path(metrics).is_file():
        from covidscan.reports import _fmt

        m = json.loads(Path(metrics).read_text())
        mm, ci = m["metrics"], m["ci95"]
        lines += [
            f"Evaluated on {m['evaluated_on']} ({m['split_type']}, n = {mm['n']}); 95% bootstrap intervals.",
            "",
            f"- accuracy {_fmt(mm['accuracy'], ci.get('accuracy'))} %; ECE {m['ece']:.3f}",
            "",
            "| class | sensitivity % | specificity % | PPV % | AUROC |",
            "|---|---|---|---|---|",
        ]
        for c, n in enumerate(names):
            pc = mm["per_class"]
            lines.append(
                f"| {n} | {_fmt(pc['sensitivity'][c], ci.get(f'sensitivity/{c}'))} | "
                f"{_fmt(pc['specificity'][c], ci.get(f'specificity/{c}'))} | {_fmt(pc['ppv'][c], ci.get(f'ppv/{c}'))} | "
                f"{_fmt(pc['auroc'][c], ci.get(f'auroc/{c}'), pct=False)} |"
            )
    else:
        vm = meta.get("val_metrics", {})
        lines.append(
            f"Validation only (run `covidscan evaluate` for test metrics with intervals): accuracy "
            f"{vm.get('val_acc', float('nan')):.3f}, loss {vm.get('val_loss', float('nan')):.3f}."
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
        "- CT: the public set has no patient ids, so slices of one patient can sit in train and test.",
        "- Probabilities are calibrated only as far as the reported ECE shows, on data like the test set.",
        "",
    ]
    return "\n".join(lines)

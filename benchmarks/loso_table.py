"""Collect runs/loso/* (from benchmarks/loso_compare.sh) into markdown tables, one per task.

    python benchmarks/loso_table.py runs/loso

Per left-out source the cell gives what is defined there with its 95% group-bootstrap interval:
COVID AUROC when the source holds COVID and non-COVID images, else COVID sensitivity (a
COVID-only collection) or specificity (a collection without COVID).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _pct(v, ci):
    s = f"{v * 100:.0f}"
    return s + (f" [{ci[0] * 100:.0f}, {ci[1] * 100:.0f}]" if ci and ci[0] == ci[0] else "")


def cell(f: dict) -> str:
    if f["covid_auroc"] == f["covid_auroc"]:  # both kinds present
        ci = f.get("covid_auroc_ci")
        s = f"AUROC {f['covid_auroc']:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
        return s + f"; sens {f['covid_sensitivity'] * 100:.0f}, spec {f['covid_specificity'] * 100:.0f}"
    if f["covid_sensitivity"] == f["covid_sensitivity"]:
        return "sens " + _pct(f["covid_sensitivity"], f.get("covid_sensitivity_ci"))
    return "spec " + _pct(f["covid_specificity"], f.get("covid_specificity_ci"))


def describe(cfg: dict) -> str:
    opts = [f"sampler {cfg['train']['sampler']}"]
    if cfg["data"]["equalize"]:
        opts.append("equalise")
    if cfg["data"]["crop"]:
        opts.append(f"border crop {cfg['data']['crop']:g}")
    if cfg["data"].get("lung_crop"):
        opts.append("lung crop")
    if cfg["model"]["freeze_backbone"]:
        opts.append("frozen backbone")
    else:
        a = cfg["augment"]
        aug = (
            f"rot {a['rotation']:g}, zoom {a['zoom']:g}, shift {a['shift']:g}, brightness/contrast {a['brightness']:g}/{a['contrast']:g}"
            if a["enabled"]
            else "no augmentation"
        )
        opts.append(f"fine-tuned {cfg['train']['epochs']} epochs, {aug}")
    return ", ".join(opts)


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/loso")
    runs: dict[str, list] = {}
    for d in sorted(root.iterdir()):
        f = d / "loso.json"
        if f.is_file():
            r = json.loads(f.read_text())
            runs.setdefault(r["task"], []).append((d.name, r))
    ext = root / "single_source" / "external" / "metrics.json"
    for task, items in runs.items():
        sources = sorted({f["source"] for _, r in items for f in r["folds"]})
        print(f"\n**{task}**\n")
        print("| setting | pooled out-of-source COVID AUROC [95% CI] | " + " | ".join(f"{s} left out" for s in sources) + " |")
        print("|---|---|" + "---|" * len(sources))
        if task == "xray" and ext.is_file():
            m = json.loads(ext.read_text())
            c = m["class_names"].index("covid")
            lo, hi = m["ci95"][f"auroc/{c}"]
            pc = m["metrics"]["per_class"]
            print(
                f"| single source (`xray` only) -> all of `xray-extra` | {pc['auroc'][c]:.3f} [{lo:.3f}, {hi:.3f}] | "
                f"sens {pc['sensitivity'][c] * 100:.1f}, spec {pc['specificity'][c] * 100:.1f} on all of xray-extra |"
                + " |"
                * (len(sources) - 1)
            )
        for name, r in items:
            p = r["pooled"]
            ci = p.get("covid_auroc_ci") or [float("nan")] * 2
            by = {f["source"]: cell(f) for f in r["folds"]}
            print(
                f"| {name} ({describe(r['config'])}) | **{p['covid_auroc']:.3f}** [{ci[0]:.3f}, {ci[1]:.3f}] | "
                + " | ".join(by.get(s, "-") for s in sources)
                + " |"
            )


if __name__ == "__main__":
    main()

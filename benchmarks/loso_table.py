"""Collect runs/loso/* (from benchmarks/loso_compare.sh) into one markdown table.

python benchmarks/loso_table.py runs/loso > docs/results/generalisation_table.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/loso")
    print("| setting | pooled out-of-source COVID AUROC [95% CI] | per left-out source (COVID sens. / spec. %, AUROC) |")
    print("|---|---|---|")
    ext = root / "single_source" / "external" / "metrics.json"
    if ext.is_file():
        m = json.loads(ext.read_text())
        c = m["class_names"].index("covid")
        lo, hi = m["ci95"][f"auroc/{c}"]
        pc = m["metrics"]["per_class"]
        print(
            f"| single source (`xray` only) -> all of `xray-extra` | {pc['auroc'][c]:.3f} [{lo:.3f}, {hi:.3f}] | "
            f"sens {pc['sensitivity'][c] * 100:.1f} / spec {pc['specificity'][c] * 100:.1f} |"
        )
    for d in sorted(root.iterdir()):
        f = d / "loso.json"
        if not f.is_file():
            continue
        r = json.loads(f.read_text())
        p = r["pooled"]
        ci = p.get("covid_auroc_ci") or [float("nan")] * 2
        folds = "; ".join(
            f"{x['source']}: "
            + "/".join("n/a" if v != v else f"{v * 100:.0f}" for v in (x["covid_sensitivity"], x["covid_specificity"]))
            + ("" if x["covid_auroc"] != x["covid_auroc"] else f", {x['covid_auroc']:.2f}")
            for x in r["folds"]
        )
        cfg = r["config"]
        opts = [f"sampler {cfg['train']['sampler']}", f"equalize {cfg['data']['equalize']}", f"crop {cfg['data']['crop']}"]
        if cfg["data"].get("lung_crop"):
            opts.append("lung crop")
        if not cfg["model"]["freeze_backbone"]:
            a = cfg["augment"]
            aug = (
                f"rot {a['rotation']:g}, zoom {a['zoom']:g}, bright/contrast {a['brightness']:g}/{a['contrast']:g}"
                if a["enabled"]
                else "off"
            )
            opts.append(f"fine-tuned {cfg['train']['epochs']} epochs, augmentation {aug}")
        name = f"{d.name} ({', '.join(opts)})"
        print(f"| {name} | {p['covid_auroc']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | {folds} |")


if __name__ == "__main__":
    main()

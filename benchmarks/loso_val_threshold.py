"""The threshold a model can ship with: 95% COVID sensitivity on its own validation split (the
collections it was trained on), applied unchanged to the collections each leave-source-out fold held
out. Per fold: specificity on each held-out non-COVID class and sensitivity on the held-out COVID
films at that threshold; for two or more runs their COVID probabilities are averaged (an ensemble).

The validation split of each fold is scored once with ``fold/best.pt`` and cached in
``fold/val_predictions.csv``; the held-out scores come from ``fold/predictions.csv``.

    python benchmarks/loso_val_threshold.py runs/exp/rec_pbn [runs/exp/incv3_plain]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from covidscan.adapt import threshold_for_sensitivity
from covidscan.checkpoint import load_checkpoint, model_from_checkpoint
from covidscan.data import read_split
from covidscan.experiments.loso import PREDICTION_FIELDS
from covidscan.labels import POSITIVE_CLASS
from covidscan.predict import predict_index


def read_scores(path: Path) -> dict[str, dict]:
    return {r["file"]: r for r in csv.DictReader(open(path))}


def val_scores(fold_dir: Path) -> dict[str, dict]:
    """COVID probability of every validation image of the fold (scored once, then read back)."""
    cache = fold_dir / "val_predictions.csv"
    if not cache.is_file():
        model, meta = model_from_checkpoint(load_checkpoint(fold_dir / "best.pt"))
        preds = predict_index(model, meta, read_split(fold_dir / "split.csv").subset("val"))
        pos = list(meta.class_names).index(POSITIVE_CLASS)
        with open(cache, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(PREDICTION_FIELDS))
            w.writeheader()
            for r, p in zip(preds.index.records, preds.probs[:, pos]):
                w.writerow({"file": str(r.path), "label": r.label, "group": r.group, "p_covid": float(p)})
    return read_scores(cache)


def averaged(members: list[dict[str, dict]]) -> tuple[list[str], np.ndarray]:
    files = sorted(members[0])
    return [members[0][f]["label"] for f in files], np.mean([[float(m[f]["p_covid"]) for f in files] for m in members], 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", type=Path, nargs="+", help="covidscan loso output folders with the same folds")
    ap.add_argument("--sensitivity", type=float, default=0.95)
    args = ap.parse_args()
    print(f"runs: {' + '.join(map(str, args.runs))}")
    for fold in sorted(p.parent.name for p in args.runs[0].glob("fold*/predictions.csv")):
        vals = [val_scores(run / fold) for run in args.runs]
        if any(set(v) != set(vals[0]) for v in vals):  # trained on other data: no shared validation split
            sys.exit(f"{fold}: the runs' validation splits differ (trained on different data); no ensemble threshold")
        vlabels, vp = averaged(vals)
        vy = np.asarray(vlabels) == POSITIVE_CLASS
        t = threshold_for_sensitivity(vy, vp, args.sensitivity)["value"]
        labels, p = averaged([read_scores(run / fold / "predictions.csv") for run in args.runs])
        labels = np.asarray(labels)
        parts = [
            f"{fold}: threshold {t:.3f} (validation: {vy.sum()} COVID, {(~vy).sum()} other, spec {(vp[~vy] < t).mean():.1%})"
        ]
        for label in sorted(set(labels)):
            sel = labels == label
            if label == POSITIVE_CLASS:
                parts.append(f"held-out COVID sensitivity {(p[sel] >= t).mean():.1%} ({sel.sum()})")
            else:
                parts.append(f"{label} specificity {(p[sel] < t).mean():.1%} ({sel.sum()})")
        print("; ".join(parts))


if __name__ == "__main__":
    main()

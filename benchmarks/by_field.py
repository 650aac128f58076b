"""Specificity of an evaluation's predictions per label and per value of a manifest field (the
projection, ``view``): at the threshold giving 95% sensitivity on that evaluation's own COVID films,
and at argmax (not predicted COVID).

    python benchmarks/by_field.py docs/results/recommended/predictions.csv --by view \
        --data ../shared/data/xray ../shared/data/xray-extra ../shared/data/xray-lungs
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from covidscan.adapt import threshold_for_sensitivity
from covidscan.data import load_dataset
from covidscan.labels import POSITIVE_CLASS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("predictions", type=Path, help="predictions.csv written by covidscan evaluate")
    ap.add_argument("--by", default="view", help="manifest field (a column, else FIELD=value in source_label)")
    ap.add_argument("--data", nargs="+", required=True, help="the dataset folders the images come from")
    ap.add_argument("--sensitivity", type=float, default=0.95)
    args = ap.parse_args()
    field = {str(r.path): r.attribute(args.by) or "?" for r in load_dataset(args.data, task="xray").records}
    rows = list(csv.DictReader(open(args.predictions)))
    labels = np.asarray([r["label"] for r in rows])
    p = np.asarray([float(r[f"p_{POSITIVE_CLASS}"]) for r in rows])
    called = np.asarray([r["predicted"] == POSITIVE_CLASS for r in rows])
    values = np.asarray([field.get(str(Path(r["file"]).resolve()), "?") for r in rows])
    t = threshold_for_sensitivity(labels == POSITIVE_CLASS, p, args.sensitivity)["value"]
    print(
        f"{args.predictions}: threshold {t:.3f} for {args.sensitivity:.0%} sensitivity on {(labels == POSITIVE_CLASS).sum()} COVID films"
    )
    for label in sorted(set(labels) - {POSITIVE_CLASS}):
        for v in sorted(set(values[labels == label])):
            sel = (labels == label) & (values == v)
            print(
                f"{label} {args.by} {v} ({sel.sum()}): specificity {(p[sel] < t).mean():.1%} at the threshold, {(~called[sel]).mean():.1%} at argmax"
            )


if __name__ == "__main__":
    main()

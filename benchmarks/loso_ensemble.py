"""Leave-source-out figures of an ensemble, from the members' own LOSO runs (no retraining):
per fold, the members' COVID probabilities of each image are averaged (what ``covidscan ensemble``
does with the full probability vectors), then AUROC with a 95% group-bootstrap interval per fold
and pooled, and the specificity on each fold's non-COVID films at the threshold giving 95%
sensitivity on the other folds' COVID films.

    python benchmarks/loso_ensemble.py runs/exp/frozen runs/exp/ft_strong
    python benchmarks/loso_ensemble.py runs/exp/rec_pbn --by view --data ../shared/data/xray-extra

``--by FIELD --data FOLDERS``: the fixed-threshold specificity also per value of a manifest field of
each image (a column, else a ``FIELD=value`` entry of ``source_label``: the projection, ``view``).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from covidscan.adapt import threshold_for_sensitivity
from covidscan.labels import POSITIVE_CLASS
from covidscan.metrics import bootstrap_ci, compute_metrics
from covidscan.results import fmt_interval


def read_fold(path: Path) -> dict[str, dict]:
    return {r["file"]: r for r in csv.DictReader(open(path))}


def summary(y: np.ndarray, p: np.ndarray, groups: list[str]) -> tuple[float, tuple]:
    probs = np.stack([1 - p, p], 1)
    auc = compute_metrics(y, probs)["per_class"]["auroc"][1]
    return auc, tuple(bootstrap_ci(y, probs, groups, n_boot=500)["auroc/1"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", type=Path, nargs="+", help="covidscan loso output folders with the same folds")
    ap.add_argument("--by", default="", help="also split the specificity by this manifest field (e.g. view)")
    ap.add_argument("--data", nargs="*", default=[], help="dataset folders whose manifests hold that field")
    args = ap.parse_args()
    field = {}
    if args.by:
        from covidscan.data import load_dataset

        field = {str(r.path): r.attribute(args.by) or "?" for r in load_dataset(args.data, task="xray").records}
    folds = sorted(p.parent.name for p in args.runs[0].glob("fold*/predictions.csv"))
    per_fold, pooled = {}, ([], [], [])
    for f in folds:
        members = [read_fold(run / f / "predictions.csv") for run in args.runs]
        files = sorted(members[0])
        rows = [members[0][x] for x in files]
        y = np.asarray([r["label"] == POSITIVE_CLASS for r in rows], int)
        p = np.mean([[float(m[x]["p_covid"]) for x in files] for m in members], axis=0)
        g = [f"{f}|{r['group']}" for r in rows]
        per_fold[f] = (y, p, [r["label"] for r in rows], [field.get(str(Path(x).resolve()), "?") for x in files])
        auc, ci = summary(y, p, g)
        print(f"{f}: n {len(y)}  COVID AUROC {fmt_interval(auc, ci, pct=False)}")
        for part, v in zip(pooled, (y, p, g)):
            part.append(v)
    y, p, g = np.concatenate(pooled[0]), np.concatenate(pooled[1]), sum(pooled[2], [])
    auc, ci = summary(y, p, g)
    print(f"pooled: n {len(y)}  COVID AUROC {fmt_interval(auc, ci, pct=False)}")
    for f, (_, pf, labels, values) in per_fold.items():
        other = np.concatenate([pp[yy == 1] for k, (yy, pp, _, _) in per_fold.items() if k != f])
        if not len(other):
            continue
        thr = threshold_for_sensitivity(np.ones(len(other), bool), other, 0.95)["value"]
        for label in sorted(set(labels) - {POSITIVE_CLASS}):
            sel = np.asarray(labels) == label
            print(
                f"{f}: specificity on {label} ({sel.sum()}) at the others' 95%-sensitivity threshold {thr:.3f}: {(pf[sel] < thr).mean():.1%}"
            )
            for v in sorted(set(values)) if args.by else []:
                part = sel & (np.asarray(values) == v)
                if part.any():
                    print(f"    {args.by} {v}: {(pf[part] < thr).mean():.1%} ({part.sum()})")


if __name__ == "__main__":
    main()

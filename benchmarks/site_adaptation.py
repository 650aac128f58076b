"""Site adaptation measured on leave-source-out folds: what BatchNorm re-estimation (no labels) and a
locally chosen threshold (a few labels) do on the sources each fold's model never saw.

For every fold of a ``covidscan loso`` run (``FOLD/best.pt``, ``FOLD/loso_split.csv``):

* as trained: COVID AUROC on the left-out images; sensitivity / specificity at argmax;
* adapted: BatchNorm statistics re-estimated on the left-out images themselves (unlabelled), same metrics;
* calibrated: the left-out images split by patient group into a 20% labelled "site calibration" part and
  the rest; the threshold for 95% COVID sensitivity is chosen on the 20% and applied to the rest.

Also, across folds: the specificity on each fold's adult non-COVID films at the threshold that gives 95%
sensitivity on the COVID films of the *other* folds (a threshold fixed before the new site is seen).

    python benchmarks/site_adaptation.py runs/exp/rec [--calib 0.2] [--seed 0]
"""

from __future__ import annotations

import argparse
import copy
import csv
from pathlib import Path

import numpy as np

from covidscan.adapt import adapt_batchnorm, threshold_for_sensitivity
from covidscan.checkpoint import load_checkpoint, model_from_checkpoint
from covidscan.data import grouped_split, read_split
from covidscan.data.dataset import default_cache_dir, open_store
from covidscan.labels import POSITIVE_CLASS
from covidscan.metrics import compute_metrics
from covidscan.predict import predict_index


def _binary(y_pos, p) -> dict:
    m = compute_metrics(np.asarray(y_pos, int), np.stack([1 - p, p], 1))
    return {
        "auroc": m["per_class"]["auroc"][1],
        "sens": m["per_class"]["sensitivity"][1],
        "spec": m["per_class"]["specificity"][1],
    }


def fold_rows(fold: Path, calib: float, seed: int) -> tuple[list[str], dict]:
    split = read_split(fold / "loso_split.csv")
    test = split.subset("test")
    model, meta = model_from_checkpoint(load_checkpoint(fold / "best.pt"))
    pos = meta.class_names.index(POSITIVE_CLASS)
    store = open_store(test.records, meta.preprocess, packed=test.packed, cache_dir=default_cache_dir() / "images")
    base = predict_index(model, meta, test, device="cpu", store=store)
    y = base.y == pos
    out = {"fold": fold.name, "n": len(y), "base": _binary(y, base.probs[:, pos])}
    adapted = copy.deepcopy(model)
    adapt_batchnorm(adapted, store, device="cpu")
    ad = predict_index(adapted, meta, test, device="cpu", store=store)
    out["adapted"] = _binary(ad.y == pos, ad.probs[:, pos])
    # a labelled calibration part of the site (whole groups), the rest for testing
    parts = grouped_split(base.index, test=calib, val=0.0, seed=seed, by_source=True)
    cal = np.asarray([a == "test" for a in parts.assignment])
    thr = threshold_for_sensitivity(y[cal], base.probs[cal, pos], 0.95)["value"]
    rest_p, rest_y = base.probs[~cal, pos], y[~cal]
    out["argmax_on_rest"] = _binary(rest_y, rest_p)
    out["calibrated_on_rest"] = {
        "threshold": thr,
        "sens": float((rest_p[rest_y] >= thr).mean()),
        "spec": float((rest_p[~rest_y] < thr).mean()),
    }
    return [str(fold)], out


def cross_fold_specificity(loso_dir: Path) -> list[dict]:
    """Per fold: specificity on its non-COVID films at the 95%-sensitivity threshold of the other folds' COVID."""
    folds = {}
    for f in sorted(loso_dir.glob("fold*/predictions.csv")):
        rows = list(csv.DictReader(open(f)))
        folds[f.parent.name] = rows
    out = []
    for name, rows in folds.items():
        others = [float(r["p_covid"]) for n, rs in folds.items() if n != name for r in rs if r["label"] == POSITIVE_CLASS]
        if not others:
            continue
        thr = threshold_for_sensitivity(np.ones(len(others), bool), np.asarray(others), 0.95)["value"]
        neg = [r for r in rows if r["label"] != POSITIVE_CLASS]
        for label in sorted({r["label"] for r in neg}):
            p = np.asarray([float(r["p_covid"]) for r in neg if r["label"] == label])
            out.append({"fold": name, "label": label, "n": len(p), "threshold": thr, "specificity": float((p < thr).mean())})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("loso_dir", type=Path)
    ap.add_argument("--calib", type=float, default=0.2, help="fraction of the left-out site used as labelled calibration data")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"## {args.loso_dir}\n")
    print(
        "| fold | n | AUROC as trained | AUROC BN-adapted | sens / spec at argmax (rest) | sens / spec at site threshold (rest) |"
    )
    print("|---|---:|---:|---:|---|---|")
    for fold in sorted(p.parent for p in args.loso_dir.glob("fold*/best.pt")):
        _, r = fold_rows(fold, args.calib, args.seed)
        b, a, am, c = r["base"], r["adapted"], r["argmax_on_rest"], r["calibrated_on_rest"]
        print(
            f"| {fold.name} | {r['n']} | {b['auroc']:.3f} | {a['auroc']:.3f} | {am['sens']:.1%} / {am['spec']:.1%} | "
            f"{c['sens']:.1%} / {c['spec']:.1%} (t = {c['threshold']:.3f}) |"
        )
    print("\nSpecificity on each fold's non-COVID films at the threshold giving 95% sensitivity on the other folds' COVID:\n")
    print("| fold | class | n | threshold | specificity |")
    print("|---|---|---:|---:|---:|")
    for r in cross_fold_specificity(args.loso_dir):
        print(f"| {r['fold']} | {r['label']} | {r['n']} | {r['threshold']:.3f} | {r['specificity']:.1%} |")


if __name__ == "__main__":
    main()

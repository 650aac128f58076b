"""Test-time augmentation (each image averaged with its mirror image) on leave-source-out folds:
COVID AUROC of every fold's ``best.pt`` on its held-out images, without and with TTA, and of the
mean of several runs (an ensemble) when more than one is given.

    python benchmarks/loso_tta.py runs/exp/frozen runs/exp/ft_pbn
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from covidscan.checkpoint import load_checkpoint, model_from_checkpoint
from covidscan.data import read_split
from covidscan.data.dataset import default_cache_dir, open_store
from covidscan.labels import POSITIVE_CLASS
from covidscan.metrics import bootstrap_ci, compute_metrics
from covidscan.predict import predict_index
from covidscan.results import fmt_interval


def auroc(y, p, groups):
    probs = np.stack([1 - p, p], 1)
    return compute_metrics(y, probs)["per_class"]["auroc"][1], bootstrap_ci(y, probs, groups, n_boot=300)["auroc/1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", type=Path, nargs="+")
    args = ap.parse_args()
    folds = sorted(p.parent.name for p in args.runs[0].glob("fold*/best.pt"))
    print("| run | fold | AUROC | AUROC with TTA |\n|---|---|---|---|")
    for fold in folds:
        test = read_split(args.runs[0] / fold / "loso_split.csv").subset("test")
        scores = {False: [], True: []}
        for run in args.runs:
            model, meta = model_from_checkpoint(load_checkpoint(run / fold / "best.pt"))
            store = open_store(test.records, meta.preprocess, packed=test.packed, cache_dir=default_cache_dir() / "images")
            pos = meta.class_names.index(POSITIVE_CLASS)
            for tta in (False, True):
                pr = predict_index(model, meta, test, device="cpu", store=store, tta=tta)
                scores[tta].append(pr.probs[:, pos])
            y, groups = (pr.y == pos).astype(int), [r.group for r in pr.index.records]
            cells = [fmt_interval(*auroc(y, scores[t][-1], groups), pct=False) for t in (False, True)]
            print(f"| {run.name} | {fold} | {cells[0]} | {cells[1]} |")
        if len(args.runs) > 1:
            cells = [fmt_interval(*auroc(y, np.mean(scores[t], 0), groups), pct=False) for t in (False, True)]
            print(f"| ensemble | {fold} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()

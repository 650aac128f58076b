"""Training an ensemble: one member per recipe (and seed) on one shared split, then their average."""

from __future__ import annotations

from pathlib import Path

from covidscan.data import read_split, write_split
from covidscan.ensemble import make_ensemble
from covidscan.errors import CheckpointError
from covidscan.training.loop import train


def train_ensemble(configs: list, data, out, *, overwrite: bool = False, progress: bool = False) -> tuple[Path, list]:
    """Train one member per config into ``out/member<k>`` on one shared split (the first member's,
    grouped), then write ``out/ensemble.pt`` and a copy of the split as ``out/split.csv`` (so
    ``covidscan evaluate --checkpoint out/ensemble.pt`` scores the same held-out test images).

    Returns the ensemble's path and the members' :class:`~covidscan.training.TrainResult`.
    """
    out = Path(out)
    if (out / "ensemble.pt").exists() and not overwrite:
        raise CheckpointError(f"{out} already holds an ensemble; use --overwrite to replace it, or another --out")
    results = []
    for k, cfg in enumerate(configs):
        split = out / "member0" / "split.csv" if k else None
        results.append(
            train(cfg, None if split else data, out / f"member{k}", split_file=split, overwrite=overwrite, progress=progress)
        )
    make_ensemble([r.best_checkpoint for r in results], out / "ensemble.pt")
    write_split(read_split(out / "member0" / "split.csv"), out / "split.csv")  # file paths made relative to out
    return out / "ensemble.pt", results

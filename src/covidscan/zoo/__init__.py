"""The model zoo: covidscan's best trained models, shipped inside the package, ready in one line.

    covidscan models                                   # what is shipped: name, task, architectures, size, figures
    covidscan predict --model xray scan.png            # --model NAME wherever --checkpoint is taken
    Predictor.from_pretrained("xray")                  # the Python API

Each model is an ordinary covidscan checkpoint stored compact (:mod:`covidscan.compact`: int8 weights,
xz) beside ``zoo.json`` (the index: file, SHA-256, task, architectures, headline figures) and a model
card (``<name>.md``: what it is for and not for, the command and data hash that trained it, test-split and
leave-source-out figures with 95% intervals, parity with the float32 model, known failure modes). The
first use expands a model to a float32 checkpoint in the user cache (``$COVIDSCAN_CACHE/models``), checked
against the index's hash; later uses read that file. ``tools/zoo.py`` trains and publishes the zoo.

``$COVIDSCAN_ZOO`` points at another zoo folder (same layout), e.g. one ``tools/zoo.py`` just wrote.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from covidscan.errors import CheckpointError

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = {"xray": "xray", "ct": "ct"}  # the model `serve` uses with neither --checkpoint nor --model


@dataclass(frozen=True)
class ZooEntry:
    """One shipped model (a row of ``zoo.json``)."""

    name: str
    task: str
    file: str
    sha256: str
    size_bytes: int
    architectures: list = field(default_factory=list)
    summary: str = ""
    card: str = ""
    headline: dict = field(default_factory=dict)
    folder: Path = HERE

    @property
    def path(self) -> Path:
        return self.folder / self.file

    @property
    def card_path(self) -> Path:
        return self.folder / self.card


def zoo_dir() -> Path:
    """``$COVIDSCAN_ZOO`` when set, else the folder shipped inside the package."""
    return Path(os.environ["COVIDSCAN_ZOO"]) if os.environ.get("COVIDSCAN_ZOO") else HERE


def list_models(folder: Path | None = None) -> list[ZooEntry]:
    """The zoo's models (none when the folder has no ``zoo.json``)."""
    folder = folder or zoo_dir()
    index = folder / "zoo.json"
    if not index.is_file():
        return []
    rows = json.loads(index.read_text(encoding="utf-8")).get("models", [])
    known = set(ZooEntry.__dataclass_fields__) - {"folder"}
    return [ZooEntry(**{k: v for k, v in r.items() if k in known}, folder=folder) for r in rows]


def get_model(name: str, folder: Path | None = None) -> ZooEntry:
    """Raises:
    CheckpointError: no model of that name (the message lists the zoo)."""
    models = list_models(folder)
    for m in models:
        if m.name == name:
            return m
    names = ", ".join(m.name for m in models) or "none: this installation ships no models"
    raise CheckpointError(f"no model {name!r} in the zoo (models: {names}; `covidscan models` lists them)")


def checkpoint_path(name: str, *, folder: Path | None = None) -> Path:
    """A float32 checkpoint of zoo model ``name``: expanded once into the user cache, then reused.

    Raises:
        CheckpointError: unknown name, a shipped file missing or not matching the index's SHA-256.
    """
    from covidscan.compact import expand_checkpoint, sha256
    from covidscan.data.dataset import default_cache_dir

    entry = get_model(name, folder)
    out = default_cache_dir() / "models" / f"{entry.name}-{entry.sha256[:16]}.pt"
    if out.is_file():
        return out
    if not entry.path.is_file():
        raise CheckpointError(f"zoo model {name!r}: its weights file {entry.path} is missing from this installation")
    got = sha256(entry.path)
    if got != entry.sha256:
        raise CheckpointError(
            f"zoo model {name!r}: {entry.path} has SHA-256 {got[:16]}..., the index says {entry.sha256[:16]}..."
        )
    return expand_checkpoint(entry.path, out)  # written to a temporary name and renamed: never half a file


def models_table(models: list[ZooEntry]) -> str:
    """``covidscan models``: one row per model."""
    if not models:
        return "no models in the zoo"
    lines = ["| name | task | architectures | size | headline | card |", "|---|---|---|---|---|---|"]
    for m in models:
        head = "; ".join(f"{k}: {v}" for k, v in m.headline.items())
        lines.append(
            f"| {m.name} | {m.task} | {' + '.join(m.architectures)} | {m.size_bytes / 1e6:.1f} MB | {head} | {m.card_path} |"
        )
    return "\n".join(lines)

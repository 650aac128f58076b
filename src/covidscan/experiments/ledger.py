"""The experiment ledger (``experiments/ledger.yaml``): every leave-source-out variant measured, by name.

    covidscan ledger list                                   # names, recipes, yardsticks, seeds
    covidscan ledger run rec_pbn incv3_plain --out runs/exp # train them (resumable: finished folds are kept)
    covidscan ledger report zoo_xray --out runs/exp         # pool a variant or an ensemble of variants

A variant is a recipe (``config`` + ``set`` overrides), a yardstick (dataset folders under the data root, the
sources held out together, or with ``field`` the values of another manifest field such as ``patient_id``, and
optionally ``by``, a manifest field the report splits non-COVID images by) and seeds; its runs go to ``OUT/NAME`` (one seed) or ``OUT/NAME_seedS``. An
ensemble names runs to average. Replaces the per-round shell scripts and analysers of sessions 5-9.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from covidscan.errors import ConfigError

#: data names that are made, not shipped: name -> (studies folder under the data root, source name)
DERIVED = {"ctmd": ("ct-volumes", "COVID-CT-MD (Tehran)")}


@dataclass(frozen=True)
class Variant:
    name: str
    config: str
    yardstick: str
    data: list[str]
    sources: list[str]
    set: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    by: str = ""  # the yardstick's manifest field the report splits non-COVID images by (patient_id: CT patients)
    field: str = "source"  # what each fold holds out: sources, or values of this manifest field (patient_id)

    def runs(self) -> list[tuple[str, int | None]]:
        """``(run folder name, seed)`` per run: ``NAME`` without seeds, else ``NAME_seedS``."""
        return [(f"{self.name}_seed{s}", s) for s in self.seeds] if self.seeds else [(self.name, None)]


def load_ledger(path: str | Path) -> tuple[dict[str, Variant], dict[str, list[str]]]:
    """Variants and ensembles of a ledger file.

    Raises:
        ConfigError: an unknown yardstick, or an ensemble naming a run no variant makes.
    """
    d = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    sticks = d.get("yardsticks") or {}
    variants = {}
    for name, v in (d.get("variants") or {}).items():
        if v.get("yardstick") not in sticks:
            raise ConfigError(f"{path}: variant {name!r}: unknown yardstick {v.get('yardstick')!r} (known: {', '.join(sticks)})")
        y = sticks[v["yardstick"]]
        variants[name] = Variant(name, v["config"], v["yardstick"], list(y["data"]), list(y.get("sources") or []),
                                 list(v.get("set") or []), list(v.get("seeds") or []), str(y.get("by") or ""),
                                 str(y.get("field") or "source"))  # fmt: skip
    runs = {r for v in variants.values() for r, _ in v.runs()}
    ensembles = {k: list(m) for k, m in (d.get("ensembles") or {}).items()}
    for k, members in ensembles.items():
        missing = [m for m in members if m not in runs]
        if missing:
            raise ConfigError(f"{path}: ensemble {k!r} names runs no variant makes: {', '.join(missing)}")
    return variants, ensembles


def dataset_paths(names: list[str], root: Path, out: Path) -> list[Path]:
    """Dataset folders by name: ``root/NAME``, or for a :data:`DERIVED` name the slices exported once to ``out/NAME``."""
    paths = []
    for name in names:
        if name in DERIVED:
            studies, source = DERIVED[name]
            made = out / name
            if not (made / "manifest.csv").is_file():
                from covidscan.study import export_slices

                export_slices(root / studies, made, source=source)
            paths.append(made)
        else:
            paths.append(root / name)
    return paths


def run_variant(v: Variant, root: Path, out: Path, *, progress: bool = False, only: str | None = None) -> list[Path]:
    """Train (or finish) every run of ``v``, or only the run folder named ``only`` (one seed); returns their folders."""
    from covidscan.config import load_config
    from covidscan.experiments.loso import leave_one_source_out

    folders = []
    for run, seed in v.runs():
        if only is not None and run != only:
            continue
        cfg = load_config(v.config, v.set + ([f"train.seed={seed}"] if seed is not None else []))
        leave_one_source_out(
            cfg,
            dataset_paths(v.data, root, out),
            out / run,
            sources=v.sources or None,
            field=v.field,
            progress=progress,
            resume=True,
        )
        folders.append(out / run)
    return folders


def variant_of(name: str, variants: dict[str, Variant]) -> tuple[Variant, str | None]:
    """The variant ``name`` is, or whose run folder it names (``NAME_seedS``): ``(variant, run or None)``.

    Raises:
        ConfigError: no variant is or makes ``name``.
    """
    if name in variants:
        return variants[name], None
    for v in variants.values():
        if any(name == r for r, _ in v.runs()):
            return v, name
    raise ConfigError(f"{name!r} is no variant or run of the ledger (covidscan ledger list)")


def report_split(name: str, variants: dict[str, Variant], ensembles: dict[str, list[str]], root: Path, out: Path) -> dict:
    """``pool``'s ``by`` and ``data`` for reporting ``name``: its yardstick's ``by`` field (an ensemble: its first
    member's), read from the yardstick's datasets; ``{}`` when the yardstick names none."""
    first = ensembles[name][0] if name in ensembles else name
    v, _ = variant_of(first, variants)
    return {"by": v.by, "data": dataset_paths(v.data, root, out)} if v.by else {}


def resolve_runs(name: str, variants: dict[str, Variant], ensembles: dict[str, list[str]], out: Path) -> list[list[Path]]:
    """What ``report NAME`` pools: an ensemble (one list of member runs), a variant (each of its runs alone),
    or a run folder name.

    Raises:
        ConfigError: the name is none of these.
    """
    if name in ensembles:
        return [[out / m for m in ensembles[name]]]
    if name in variants:
        return [[out / r] for r, _ in variants[name].runs()]
    if any(name == r for v in variants.values() for r, _ in v.runs()):
        return [[out / name]]
    raise ConfigError(f"{name!r} is no variant, run or ensemble of the ledger (covidscan ledger list)")

"""What ``covidscan predict`` prints: a table, CSV or strict JSON, from :class:`~covidscan.inference.Prediction`,
:class:`FileError` and :class:`~covidscan.study.StudyResult` records (never from loose dicts)."""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class FileError:
    """A file that could not be predicted: it keeps its row, with the reason, and the others go on."""

    source: str
    error: str

    def to_dict(self) -> dict:
        return {"source": self.source, "error": self.error}


def decision_text(p) -> str:
    d = p.decision
    if not d:
        return ""
    return f"{d['class']} {'POSITIVE' if d['positive'] else 'negative'} (p >= {d['threshold']:.3f})"


def print_table(items: list, names: list[str], out=None) -> None:
    """One row per file: label (``(outside)`` for a scan the model does not know, ``(error)`` for a file it
    could not read), one probability per class, the decision at a calibrated threshold, warnings."""
    out = out or sys.stdout
    width = max([len(i.source) for i in items] + [4])
    thresholded = any(getattr(i, "decision", None) for i in items)
    head = f"{'file':<{width}}  {'label':<10} " + " ".join(f"{n:>10}" for n in names)
    print(head + ("  at threshold" + " " * 20 if thresholded else "") + "  warnings", file=out)
    for i in items:
        if isinstance(i, FileError):
            print(f"{i.source:<{width}}  {'(error)':<10} " + " ".join(f"{'-':>10}" for _ in names) + f"  {i.error}", file=out)
            continue
        probs = " ".join(f"{i.probabilities[n]:>10.4f}" for n in names)
        decision = f"  {decision_text(i):<33}" if thresholded else ""
        label = "(outside)" if i.out_of_distribution else i.label  # no class for a scan the model does not know
        print(f"{i.source:<{width}}  {label:<10} {probs}{decision}  {'; '.join(i.warnings)}", file=out)


def write_csv(items: list, names: list[str], out=None) -> None:
    """CSV with a header; a file that failed has an empty label and probabilities and its error in ``error``."""
    w = csv.writer(out or sys.stdout)
    w.writerow(["file", "label", *names, "decision", "warnings", "out_of_distribution", "error"])
    for i in items:
        if isinstance(i, FileError):
            w.writerow([i.source, "", *([""] * len(names)), "", "", "", i.error])
            continue
        probs = (f"{i.probabilities[n]:.6f}" for n in names)
        ood = str(i.out_of_distribution).lower()
        w.writerow([i.source, i.label, *probs, decision_text(i), "; ".join(i.warnings), ood, ""])


def write_json(items: list, out=None) -> None:
    """Strict JSON: one object per file (a failed file: ``{"source", "error"}``)."""
    from covidscan.results import dumps

    print(dumps([i.to_dict() for i in items], indent=2), file=out or sys.stdout)


def write_studies(results: list, fmt: str, outputs: dict | None = None, out=None) -> None:
    """CT studies: one line each (``table``), CSV or JSON; ``outputs``: study -> folder written by --study-out."""
    out = out or sys.stdout
    outputs = outputs or {}
    rows = [{**r.to_dict(), **({"outputs": outputs[r.study]} if r.study in outputs else {})} for r in results]
    if fmt == "json":
        from covidscan.results import dumps

        print(dumps(rows, indent=2), file=out)
    elif fmt == "csv" and rows:
        w = csv.DictWriter(out, fieldnames=[k for k in rows[0] if k != "warnings"] + ["warnings"], extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "warnings": "; ".join(r["warnings"])})
    elif fmt == "table":
        for r in results:
            print(r.line(), file=out)

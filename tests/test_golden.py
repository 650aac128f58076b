"""Golden outputs: what ``predict`` (table, CSV, JSON) and ``evaluate`` (report.md, metrics.json keys,
predictions.csv) print for the checkpoint of covidscan 0.1 on fixed synthetic scans. A change of format shows
here as a diff; numbers are compared to 2e-4 (other CPUs round the last digits differently).

Regenerate after an intended change: ``COVIDSCAN_GOLDEN=write python -m pytest tests/test_golden.py``."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covidscan.cli import main
from tests.conftest import chest_like

FIXTURES = Path(__file__).resolve().parent / "fixtures"
GOLDEN = FIXTURES / "golden"
NUMBER = re.compile(r"-?\d+\.\d+(?:e-?\d+)?")


def scans(folder: Path) -> Path:
    """Two scans per class of the task xray, made the same way every time."""
    for k, label in enumerate(("covid", "pneumonia", "normal")):
        (folder / label).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            arr = (chest_like(40, 100 + 10 * k + i, label_shift=0.3 * k) * 255).astype(np.uint8)
            Image.fromarray(arr, mode="L").save(folder / label / f"{label}_{i}.png")
    return folder


def same(got: str, name: str, tmp: Path) -> None:
    """``got`` equals the golden file, paths aside, runs of spaces (table widths follow the paths) as one, and
    numbers to 2e-4."""
    got = got.replace(str(tmp), "<DIR>").replace(str(FIXTURES), "<FIXTURES>").replace("\r\n", "\n")
    got = re.sub(r"[ ]+", " ", got)
    path = GOLDEN / name
    if os.environ.get("COVIDSCAN_GOLDEN") == "write":
        path.parent.mkdir(exist_ok=True)
        path.write_text(got, encoding="utf-8")
    want = path.read_text(encoding="utf-8")
    assert NUMBER.sub("#", got) == NUMBER.sub("#", want), f"{name}: the text around the numbers changed"
    a, b = [float(x) for x in NUMBER.findall(got)], [float(x) for x in NUMBER.findall(want)]
    assert np.allclose(a, b, atol=2e-4, rtol=0), f"{name}: numbers changed"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return scans(tmp_path_factory.mktemp("golden") / "scans")


@pytest.mark.parametrize("fmt, name", [([], "predict_table.txt"), (["--csv"], "predict.csv"), (["--json"], "predict.json")])
def test_predict_output_is_unchanged(data, capsys, fmt, name):
    ckpt = FIXTURES / "checkpoint_v1_before_redesign.pt"
    assert main(["predict", "--checkpoint", str(ckpt), str(data), "--quiet", *fmt]) == 0
    same(capsys.readouterr().out, name, data.parent)


def test_evaluate_output_is_unchanged(data, tmp_path, capsys):
    ckpt = FIXTURES / "checkpoint_v1_before_redesign.pt"
    out = tmp_path / "ev"
    assert (
        main(["evaluate", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--bootstrap", "50", "--quiet"]) == 0
    )
    capsys.readouterr()
    same((out / "report.md").read_text().replace(str(tmp_path), "<OUT>"), "evaluate_report.md", data.parent)
    same((out / "predictions.csv").read_text(), "evaluate_predictions.csv", data.parent)
    keys = sorted(json.loads((out / "metrics.json").read_text()))
    same(json.dumps(keys) + "\n", "evaluate_metrics_keys.json", data.parent)

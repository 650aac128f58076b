import json

import numpy as np
import pytest

from covidscan.cli import main
from covidscan.evaluation import evaluate
from tests.conftest import make_folder_dataset


def test_evaluate_writes_report_and_figures(trained_run, tmp_path):
    result, data = trained_run
    out = tmp_path / "eval"
    r = evaluate(result.best_checkpoint, out=out, grid=4, n_boot=50)
    for name in ("report.md", "metrics.json", "confusion.png", "roc.png", "reliability.png", "grid.png"):
        assert (out / name).stat().st_size > 500, name
    report = (out / "report.md").read_text()
    assert "weights source: none" in report and "patient-grouped" in report
    m = json.loads((out / "metrics.json").read_text())
    n = sum(c["images"] for c in m["counts"].values())
    assert m["metrics"]["n"] == n == np.sum(m["metrics"]["confusion"])
    lo, hi = m["ci95"]["accuracy"]
    assert lo <= m["metrics"]["accuracy"] <= hi
    assert r.bootstrap["unit"] == "patient group"
    # one self-contained HTML file: every figure linked from report.md embedded, nothing fetched from elsewhere
    html = (out / "report.html").read_text()
    for fig in ("confusion.png", "roc.png", "reliability.png", "grid.png"):
        assert f"]({fig})" in report
    assert html.count('src="data:image/png;base64,') == 4 and "http://" not in html and "https://" not in html
    assert "<table>" in html and "<th>class</th>" in html
    assert "report.html" not in html  # the HTML report does not point to itself


def test_grid_shows_mistakes_first():
    from covidscan.reports import grid_picks

    y = np.array([0, 0, 1, 1, 2, 2, 0, 1])
    probs = np.eye(3)[[0, 1, 1, 0, 2, 2, 2, 1]] * 0.5 + 0.5 / 3  # mistakes at 1, 3 and 6
    probs[3, 0] += 0.1  # the most confident mistake
    picks = grid_picks(y, probs, 5)
    assert picks[0] == 3 and set(picks[:3]) == {1, 3, 6} and len(set(picks)) == 5
    assert set(picks[3:]) <= {0, 2, 4, 5, 7}
    assert len(grid_picks(y, probs, 2)) == 2 and set(grid_picks(y, probs, 2)) <= {1, 3, 6}
    random_picks = [tuple(grid_picks(y, probs, 3, errors_first=False, seed=s)) for s in range(20)]
    assert any(not set(p) & {1, 3, 6} for p in random_picks)  # the paper's random draw: not mistakes by design


def test_roc_band_brackets_the_curve():
    from sklearn.metrics import roc_curve

    from covidscan.reports import roc_band

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    score = y + rng.normal(0, 0.8, 400)
    grid, lo, hi = roc_band(y, score, n_boot=200)
    fpr, tpr, _ = roc_curve(y, score)
    curve = np.interp(grid, fpr, tpr)
    assert np.all(lo <= hi) and np.mean((lo <= curve + 1e-9) & (curve <= hi + 1e-9)) > 0.95
    assert 0.02 < np.mean(hi - lo) < 0.3  # a band, not a line and not the whole square
    _, lo_small, hi_small = roc_band(y[:60], score[:60], n_boot=200)
    assert np.mean(hi_small - lo_small) > np.mean(hi - lo)  # fewer images, wider band


def test_external_set_with_missing_class(trained_run, tmp_path, capsys):
    result, _ = trained_run
    ext = make_folder_dataset(tmp_path / "external", classes=("covid", "normal"), per_class=4, size=48, manifest=False, seed=9)
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(result.best_checkpoint),
                "--data",
                str(ext),
                "--out",
                str(tmp_path / "ev"),
                "--bootstrap",
                "20",
                "--quiet",
            ]
        )
        == 0
    )
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["absent_classes"] == ["pneumonia"]
    assert m["metrics"]["per_class"]["sensitivity"][1] is None or np.isnan(m["metrics"]["per_class"]["sensitivity"][1])
    assert "Absent from this set" in (tmp_path / "ev" / "report.md").read_text()
    assert "image-level" in m["split_type"]


def test_reproduce_end_to_end_tiny(tmp_path):
    from covidscan.experiments.reproduce import reproduce

    data = make_folder_dataset(tmp_path / "d", per_class=20, size=40, groups_per_class=10)
    res = reproduce(
        "xray",
        data,
        tmp_path / "rep",
        epochs=1,
        n_boot=20,
        grid=4,
        overrides=["data.image_size=80", "train.batch_size=8", "model.download=false"],
    )
    rows = res["rows"]
    assert [(r["protocol"], r["model"]) for r in rows] == [
        (p, m) for p in ("paper", "grouped") for m in ("densenet", "inception_v3", "new_densenet")
    ]
    table = (tmp_path / "rep" / "table.md").read_text()
    assert "92.35" in table and "63.56" in table
    dense = [r for r in rows if r["backbone"] == "densenet121"]
    assert all(r["weights_source"].startswith("none") and "from scratch" in r["note"] for r in dense)
    inc = [r for r in rows if r["model"] == "inception_v3"]
    assert all("fid-helper" in r["weights_source"] for r in inc)
    assert all(0 <= r["accuracy"] <= 1 for r in rows)


def test_evaluate_needs_data(tmp_path, trained_run):
    import shutil

    result, _ = trained_run
    lone = tmp_path / "lone.pt"
    shutil.copy(result.best_checkpoint, lone)
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate(lone)


def test_subgroups_by_manifest_field_match_the_per_image_predictions(trained_run, tmp_path, capsys):
    import csv
    import shutil

    _, data = trained_run
    ext = tmp_path / "ext"
    shutil.copytree(data, ext)
    rows = list(csv.DictReader(open(ext / "manifest.csv")))
    for k, r in enumerate(rows):  # the projection as the shipped manifests record it, in source_label
        r["source_label"] = f"finding=x; view={'AP' if k % 3 else 'PA'}; age=50"
    with open(ext / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(trained_run[0].best_checkpoint), "--data", str(ext), "--out", str(out),
                 "--by", "view", "--by", "source", "--bootstrap", "0", "--quiet"]) == 0  # fmt: skip
    got = json.loads((out / "metrics.json").read_text())["subgroups"]
    preds = list(csv.DictReader(open(out / "predictions.csv")))
    view = {str((ext / r["file"]).resolve()): "AP" if k % 3 else "PA" for k, r in enumerate(rows)}
    for field, key in (("view", lambda p: view[p["file"]]), ("source", lambda p: p["source"])):
        want = {}
        for p in preds:
            want.setdefault(key(p), []).append(p)
        assert [g["value"] for g in got[field]] == sorted(want)
        for g in got[field]:
            ps = want[g["value"]]
            assert g["images"] == len(ps) and g["covid"] == sum(p["label"] == "covid" for p in ps)
            assert g["accuracy"] == pytest.approx(np.mean([p["predicted"] == p["label"] for p in ps]))
            neg = [p for p in ps if p["label"] != "covid"]
            if neg:
                assert g["covid_specificity"] == pytest.approx(np.mean([p["predicted"] != "covid" for p in neg]))
    assert "Subgroups by view" in (out / "report.md").read_text() and "| PA |" in capsys.readouterr().out

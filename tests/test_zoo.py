"""The model zoo: compact weights, the shipped index and cards, and the training pipeline rehearsed on CPU."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from covidscan.cli import main
from covidscan.compact import dequantize, quantize, sha256
from tests.conftest import SHARED_DATA, make_folder_dataset

REPO = Path(__file__).resolve().parents[1]


def zoo_tool():
    spec = importlib.util.spec_from_file_location("zoo_tool", REPO / "tools" / "zoo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_int8_weights_move_at_most_half_a_step_and_keep_the_rest():
    g = torch.Generator().manual_seed(0)
    state = {"conv.weight": torch.randn(8, 3, 3, 3, generator=g), "bn.running_mean": torch.randn(8, generator=g),
             "fc.weight": torch.randn(3, 16, generator=g) * 0.01, "bn.num_batches_tracked": torch.tensor(5)}  # fmt: skip
    q = quantize(state)
    assert q["conv.weight"].dtype == torch.int8 and q["bn.running_mean"] is state["bn.running_mean"]
    back = dequantize(q)
    assert set(back) == set(state)
    for k in ("conv.weight", "fc.weight"):
        step = state[k].abs().amax(dim=tuple(range(1, state[k].ndim)), keepdim=True) / 127
        assert ((back[k] - state[k]).abs() <= step / 2 + 1e-7).all()
    assert torch.equal(back["bn.num_batches_tracked"], state["bn.num_batches_tracked"])
    mixed = quantize(state, min_numel=100)  # the compact files' rule: small layers in float16, large in int8
    assert mixed["conv.weight"].dtype == torch.int8 and mixed["fc.weight"].dtype == torch.float16
    assert mixed["bn.running_mean"].dtype == torch.float16 and mixed["bn.num_batches_tracked"].dtype == torch.int64
    back = dequantize(mixed)
    assert back["fc.weight"].dtype == torch.float32 and torch.equal(back["fc.weight"], state["fc.weight"].half().float())


def test_zoo_pipeline_rehearsed_on_cpu(tmp_path, monkeypatch, capsys):
    """tools/zoo.py train --smoke on synthetic folders named like ../shared's: every step the real zoo goes
    through (train-ensemble, evaluate, compact, parity, card, zoo.json), then the zoo used by name."""
    root = tmp_path / "data"
    for k, name in enumerate(("xray", "xray-extra", "xray-lungs")):
        make_folder_dataset(root / name, per_class=6, size=48, seed=k)
    for k, name in enumerate(("ct", "ct-extra", "ct-more")):
        make_folder_dataset(root / name, classes=("covid", "normal"), per_class=6, size=48, seed=10 + k)
    studies = ct_studies(root / "ct-volumes")
    out = tmp_path / "zoo"
    subprocess.run([sys.executable, str(REPO / "tools" / "zoo.py"), "train", "--smoke", "--data-root", str(root),
                    "--out", str(out)], check=True, cwd=tmp_path)  # fmt: skip
    index = json.loads((out / "zoo.json").read_text())
    assert [m["name"] for m in index["models"]] == ["xray", "ct"]
    ct = index["models"][1]
    assert (out / "ctmd" / "manifest.csv").is_file()  # the CT studies' lung slices were exported and trained on
    ct_card = (out / "ct.md").read_text()
    assert "covidscan study-slices" in ct_card and ct["data_sha256"] in ct_card and "body" in ct_card
    entry = index["models"][0]
    assert entry["name"] == "xray" and entry["sha256"] == sha256(out / entry["file"])
    tool = zoo_tool()
    card = (out / "xray.md").read_text()
    assert tool.RECIPES["xray"]["command"] in card and entry["data_sha256"] in card
    assert entry["parity"]["max_probability_difference"] < 0.05
    assert "Leave-source-out figures" in card and "Known failure modes" in card
    # the zoo in use: list, predict by name, the Python API; expanded once into the cache
    monkeypatch.setenv("COVIDSCAN_ZOO", str(out))
    capsys.readouterr()
    assert main(["models"]) == 0 and "| xray | xray |" in capsys.readouterr().out
    img = next((root / "xray" / "covid").glob("*.png"))
    assert main(["predict", "--model", "xray", str(img), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    from covidscan.inference import Predictor

    p = Predictor.from_pretrained("xray", device="cpu").predict(img)
    assert p.probabilities["covid"] == pytest.approx(row["probabilities"]["covid"], abs=1e-6)
    float_model = Predictor.from_checkpoint(out / "xray" / "ensemble.pt", device="cpu").predict(img)
    assert (
        abs(float_model.probabilities["covid"] - p.probabilities["covid"]) <= entry["parity"]["max_probability_difference"] + 0.01
    )
    cached = list((Path(__import__("os").environ["COVIDSCAN_CACHE"]) / "models").glob("xray-*.pt"))
    assert len(cached) == 1
    # a damaged shipped file is refused by its hash, in one line, before anything is written
    cached[0].unlink()
    (out / entry["file"]).write_bytes((out / entry["file"]).read_bytes()[:-10])
    assert main(["predict", "--model", "xray", str(img)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SHA-256" in err[0]
    assert main(["predict", "--model", "nope", str(img)]) == 2 and "no model 'nope'" in capsys.readouterr().err
    # the CT model by name on a whole series (the study path), and publish keeps models the run did not make
    capsys.readouterr()
    assert main(["predict", "--model", "ct", str(studies[0]), "--json"]) == 0
    study = json.loads(capsys.readouterr().out)[0]
    assert study["positive_class"] == "covid" and study["n_scored"] > 0 and 0.0 <= study["probability"] <= 1.0
    package = tmp_path / "package_zoo"
    package.mkdir()
    (package / "zoo.json").write_text(json.dumps({"models": [{"name": "older", "file": "o.cspt", "card": "o.md"}]}))
    monkeypatch.setattr(tool, "PACKAGE_ZOO", package)
    tool.main(["publish", str(out)])
    assert [m["name"] for m in json.loads((package / "zoo.json").read_text())["models"]] == ["xray", "ct", "older"]
    assert (package / "ct.cspt").read_bytes() == (out / "ct.cspt").read_bytes()


def ct_studies(root: Path) -> list[Path]:
    """A tiny folder of CT studies like ../shared/data/ct-volumes: two COVID, two non-COVID DICOM series."""
    from tests.test_volumes import phantom, write_series

    root.mkdir(parents=True)
    rows, series = ["series,label,task_label,patient_id"], []
    for k, label in enumerate(("covid", "covid", "cap", "normal")):
        hu = phantom(6, size=48, seed=k)
        if label == "covid":
            hu[:, 20:28, 12:18] = -300  # ground glass in one lung
        write_series(root / label / f"p{k}", hu)
        rows.append(f"{label}/p{k},{label},{'covid' if label == 'covid' else 'normal'},p{k}")
        series.append(root / label / f"p{k}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return series


def test_shipped_zoo_matches_its_index_cards_and_recipes():
    from covidscan.zoo import HERE, list_models

    models = list_models(HERE)
    assert {m.name for m in models} >= {"xray"}
    tool = zoo_tool()
    total = 0
    for m in models:
        assert m.path.is_file() and sha256(m.path) == m.sha256 and m.path.stat().st_size == m.size_bytes
        total += m.size_bytes
        card = m.card_path.read_text()
        row = json.loads((HERE / "zoo.json").read_text())["models"][[x.name for x in models].index(m.name)]
        recipe = tool.RECIPES[m.name]
        assert recipe["command"] in card and recipe["data_sha256"] in card and row["data_sha256"] == recipe["data_sha256"]
        assert m.sha256 in card
        assert row["parity"]["covid_auroc_difference"] <= 0.002
    assert total <= 43e6  # the zoo adds at most 43 MB: the whole tracked tree must stay under the 64 MiB a device run carries


@pytest.mark.skipif(not (SHARED_DATA / "xray").is_dir(), reason="../shared/data not present")
def test_recipe_data_hash_is_the_shared_data(tmp_path):
    tool = zoo_tool()
    for name, r in tool.RECIPES.items():  # the CT recipe's study slices are exported afresh into tmp_path
        assert tool.data_hash(SHARED_DATA, name, tmp_path) == r["data_sha256"], name


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "xray").is_dir(), reason="../shared/data not present")
def test_shipped_xray_model_predicts_a_shared_film_and_knows_its_training_images(tmp_path):
    from covidscan.evaluation import evaluate
    from covidscan.inference import Predictor

    p = Predictor.from_pretrained("xray", device="cpu")
    assert p.meta.members and len(p.meta.members) == 2
    pred = p.predict(SHARED_DATA / "xray" / "covid" / "ieee8023_00870a9c.jpg")
    assert np.isclose(sum(pred.probabilities.values()), 1.0) and not pred.out_of_distribution
    r = evaluate(
        __import__("covidscan.zoo", fromlist=["checkpoint_path"]).checkpoint_path("xray"), SHARED_DATA / "xray-lungs", n_boot=0
    )
    assert r.overlap["checked"] and r.overlap["train"] > 100 and not r.external  # it trained on most of them


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "ct-volumes").is_dir(), reason="../shared/data not present")
def test_shipped_ct_model_reads_a_real_series_and_knows_its_training_slices(tmp_path):
    from covidscan.evaluation import evaluate
    from covidscan.inference import Predictor
    from covidscan.study import predict_study
    from covidscan.zoo import checkpoint_path

    p = Predictor.from_pretrained("ct", device="cpu")
    assert p.meta.task == "ct" and len(p.meta.members) == 2
    assert p.pre.body_crop and p.pre.lung_crop  # the recipe's framing travels with the model
    result = predict_study(p, SHARED_DATA / "ct-volumes" / "normal" / "normal001")
    assert result.scored and 0.0 <= result.probability <= 1.0 and result.spread
    r = evaluate(checkpoint_path("ct"), SHARED_DATA / "ct-more", n_boot=0)
    assert r.overlap["checked"] and r.overlap["train"] > 50 and not r.external  # it trained on most of them

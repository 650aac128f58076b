"""The redesign's promises: a light CLI, a library that needs no training code to use a model,
one error family, strict JSON, validated checkpoints, typed results and old checkpoints that load."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from covidscan.checkpoint import CheckpointMeta, load_checkpoint, model_from_checkpoint, save_checkpoint
from covidscan.cli import build_parser, main
from covidscan.errors import CheckpointError, ConfigError, CovidscanError, DataError, ImageReadError, WeightsUnavailableError
from covidscan.results import EvaluationResult, dumps, fmt_interval, write_json
from tests.conftest import make_folder_dataset, tiny_config

FIXTURES = Path(__file__).parent / "fixtures"


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_help_and_stats_do_not_import_torch(tmp_path):
    data = make_folder_dataset(tmp_path / "d", per_class=2, size=32)
    mods = _modules_after(
        "from covidscan.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        f"assert main(['stats', {str(data)!r}]) == 0"
    )
    assert "torch" not in mods and "covidscan.cli" in mods and "covidscan.data.stats" in mods


def test_using_a_model_imports_no_training_code():
    mods = _modules_after(
        "import covidscan.inference, covidscan.evaluation, covidscan.explain, covidscan.export, covidscan.probe, "
        "covidscan.card, covidscan.serve"
    )
    assert "covidscan.inference" in mods and "torch" in mods
    assert "covidscan.training" not in mods and "covidscan.experiments.loso" not in mods


def test_every_command_has_working_help(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001 (argparse keeps them here)
    assert {"stats", "split", "train", "evaluate", "predict", "serve", "loso"} <= set(commands)
    for name in [None, *commands]:
        with pytest.raises(SystemExit) as exc:
            main(["--help"] if name is None else [name, "--help"])
        assert exc.value.code == 0
        assert "usage: covidscan" in capsys.readouterr().out


def test_error_family():
    for cls in (ConfigError, DataError, ImageReadError, CheckpointError, WeightsUnavailableError):
        assert issubclass(cls, CovidscanError)
    assert issubclass(ConfigError, ValueError) and issubclass(WeightsUnavailableError, RuntimeError)


def test_missing_imagenet_weights_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty torchvision cache
    data = make_folder_dataset(tmp_path / "d", per_class=8, size=32)
    out = tmp_path / "run"
    rc = main(["train", "--data", str(data), "--out", str(out), "--quiet", "--set", "model.backbone=densenet121",
               "--set", "model.weights=imagenet", "--set", "model.download=false", "--set", "data.image_size=32"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("covidscan: error: no ImageNet weights for densenet121")
    assert not out.exists()


def test_fmt_interval():
    assert fmt_interval(0.9472, (0.915, 0.9741)) == "94.7 [91.5, 97.4]"
    assert fmt_interval(0.9472, (0.915, 0.9741), pct=False) == "0.947 [0.915, 0.974]"
    assert fmt_interval(0.5, (math.nan, 0.6)) == "50.0"
    assert fmt_interval(math.nan, (0.1, 0.2)) == "n/a" and fmt_interval(None) == "n/a"
    assert fmt_interval(0.12345, None, digits=2) == "12.35"


def _strict_loads(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_strict_json_writer(tmp_path):
    obj = {"a": math.nan, "b": [1.0, math.inf, np.float64(0.5), np.int64(3)], "c": (np.array([1, 2]), Path("x"))}
    assert _strict_loads(dumps(obj)) == {"a": None, "b": [1.0, None, 0.5, 3], "c": [[1, 2], "x"]}
    write_json(obj, tmp_path / "o.json")
    _strict_loads((tmp_path / "o.json").read_text())


def test_metrics_json_is_strict_with_undefined_metrics(trained_run, tmp_path):
    from covidscan.evaluation import evaluate

    result, _ = trained_run
    ext = make_folder_dataset(tmp_path / "ext", classes=("covid", "normal"), per_class=3, size=48, manifest=False)
    r = evaluate(result.best_checkpoint, ext, out=tmp_path / "ev", n_boot=10)
    assert math.isnan(r.metrics["per_class"]["sensitivity"][1])  # pneumonia is absent: undefined
    m = _strict_loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["metrics"]["per_class"]["sensitivity"][1] is None
    back = EvaluationResult.from_dict(m)
    assert back.class_names == r.class_names and back.metrics["n"] == r.metrics["n"]
    rows = (tmp_path / "ev" / "predictions.csv").read_text().splitlines()
    assert rows[0] == "file,label,p_covid,p_pneumonia,p_normal,predicted,group,source,seen" and len(rows) == 1 + r.metrics["n"]


def test_checkpoint_from_before_the_redesign_loads_and_predicts_the_same():
    """A checkpoint written by covidscan 0.1 before the redesign (weights stored as fp16 to keep the
    fixture small) loads with today's code and gives the probabilities the old code gave."""
    obj = load_checkpoint(FIXTURES / "checkpoint_v1_before_redesign.pt", task="xray")
    meta = obj["meta"]
    assert meta.preprocess.image_size == 32 and meta.class_names == ("covid", "pneumonia", "normal")
    assert "channel_policy" not in meta.preprocess.to_dict()  # a dead field of 0.1, ignored on load
    model, _ = model_from_checkpoint(obj)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(x).softmax(1)
    torch.testing.assert_close(got, meta.extra["fixture_expected_probs"], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"class_names": ["covid", "covid", "normal"]}, "duplicate class names"),
        ({"class_names": ["covid", "normal"]}, "do not match task 'xray'"),
        ({"task": "mri"}, "unknown task"),
        ({"preprocess": {"image_size": -5, "mean": [0.5] * 3, "std": [0.5] * 3}}, "preprocessing is not valid"),
        ({"preprocess": {"image_size": 64, "mean": [0.5] * 3, "std": [0.0] * 3}}, "preprocessing is not valid"),
        ({"threshold": {"class": "flu", "value": 0.3}}, "threshold"),
    ],
)
def test_checkpoint_metadata_is_validated(tmp_path, change, message):
    obj = torch.load(FIXTURES / "checkpoint_v1_before_redesign.pt", weights_only=True)
    bad = {**obj["meta"], **change}
    save_checkpoint(tmp_path / "bad.pt", obj["state_dict"], bad)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "bad.pt")
    assert main(["card", "--checkpoint", str(tmp_path / "bad.pt")]) == 2


def test_meta_roundtrip_keeps_unknown_keys():
    obj = torch.load(FIXTURES / "checkpoint_v1_before_redesign.pt", weights_only=True)
    meta = CheckpointMeta.from_dict({**obj["meta"], "from_the_future": 1})
    again = CheckpointMeta.from_dict(meta.to_dict())
    assert again == meta and again.to_dict()["from_the_future"] == 1 and meta["class_names"] == ["covid", "pneumonia", "normal"]


def test_second_train_into_a_run_is_refused_and_overwrite_or_resume_allowed(tmp_path, capsys):
    data = make_folder_dataset(tmp_path / "d", per_class=6, size=32)
    args = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--quiet", "--set", "model.weights=none",
            "--set", "model.backbone=efficientnet_lite0", "--set", "data.image_size=32", "--set", "train.epochs=1"]  # fmt: skip
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    capsys.readouterr()
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before  # nothing touched
    # resume with a setting that would make it another run: refused, the difference listed
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--quiet", "--set", "train.lr=0.5"]) == 2
    assert "train.lr: saved 0.001, asked 0.5" in capsys.readouterr().err.replace("0.0001", "0.001")
    # resume with more epochs: honoured
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--quiet", "--set", "train.epochs=2"]) == 0
    assert len((tmp_path / "run" / "history.jsonl").read_text().splitlines()) == 2
    assert main([*args, "--overwrite"]) == 0
    assert len((tmp_path / "run" / "history.jsonl").read_text().splitlines()) == 1


def test_class_without_images_is_an_error(tmp_path):
    from covidscan.training import train

    data = make_folder_dataset(tmp_path / "d", classes=("covid", "normal"), per_class=6, size=32)
    cfg = tiny_config(data={"task": "xray"}, train={"epochs": 1})
    with pytest.raises(DataError, match="no training images of class.*pneumonia"):
        train(cfg, data, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    res = train(tiny_config(data={"task": "xray", "allow_empty_class": True}, train={"epochs": 1}), data, tmp_path / "run")
    assert res.best_checkpoint.is_file()


def test_manifest_with_utf8_bom(tmp_path):
    from covidscan.data import load_dataset

    data = make_folder_dataset(tmp_path / "d", per_class=2, size=32)
    text = (data / "manifest.csv").read_text()
    (data / "manifest.csv").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    index = load_dataset(data)
    assert len(index) == 6 and index.grouping == "group_id"


def test_every_json_file_in_docs_is_strict():
    docs = Path(__file__).resolve().parents[1] / "docs"
    files = sorted(docs.rglob("*.json"))
    assert files
    for f in files:
        _strict_loads(f.read_text())


def test_model_summary_counts_and_shapes(tmp_path, capsys):
    """`covidscan summary`: torchinfo's totals equal the model's parameters; the diagram's stages chain shapes."""
    from covidscan.cli import main
    from covidscan.config import load_config
    from covidscan.summary import model_for, stages

    args = ["--set", "model.backbone=efficientnet_lite0", "--set", "data.task=ct", "--set", "data.image_size=64"]
    assert main(["summary", *args, "--diagram", str(tmp_path / "d.png")]) == 0
    out = capsys.readouterr().out
    model, size, _ = model_for(load_config(None, [a for a in args if a != "--set"]))
    total = sum(p.numel() for p in model.parameters())
    assert f"Total params: {total:,}" in out and "[1, 2]" in out  # CT: two classes
    rows = stages(model, size)
    assert rows[-1][0] == "head" and rows[-1][1] == (1, 2) and rows[0][1][2] < size  # the stem downsamples
    assert sum(p for _, _, p in rows) == total
    assert (tmp_path / "d.png").stat().st_size > 5000
    assert main(["summary"]) == 2  # nothing to summarise: one-line error


def test_readme_python_api_example_runs(trained_run, tmp_path, monkeypatch):
    """The README's Python API block, run as written with a tiny checkpoint and synthetic scans for its paths."""
    import re

    from PIL import Image

    result, data = trained_run
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## Python API\n\n```python\n(.*?)```", readme, re.S).group(1)
    scan = next((data / "covid").glob("*.png"))
    code = (
        block.replace("runs/recommended/best.pt", str(result.best_checkpoint))
        .replace("../shared/data/xray/covid/ieee8023_00870a9c.jpg", str(scan))
        .replace('"runs/test"', repr(str(tmp_path / "ext")))
    )
    assert "../shared" not in code and "runs/" not in code.replace(str(result.best_checkpoint), "")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "ext" / "report.md").is_file()
    # the forms predict takes agree: path, bytes, array (uint8 and float), list
    from covidscan.inference import Predictor

    p = Predictor.from_checkpoint(result.best_checkpoint, device="cpu")
    ref = p.predict(scan).probabilities["covid"]
    arr = np.asarray(Image.open(scan).convert("L"))
    got = [p.predict(scan.read_bytes()), p.predict(arr), p.predict(arr.astype(np.float32) / 255), *p.predict([scan, arr])]
    assert all(abs(g.probabilities["covid"] - ref) < 1e-5 for g in got)
    with pytest.raises(ValueError, match="expected H x W"):
        p.predict(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        p.predict(np.full((8, 8), 3.0, np.float32))


@pytest.mark.parametrize("backbone", __import__("covidscan.models", fromlist=["list_backbones"]).list_backbones())
def test_summary_totals_are_complete_for_every_backbone(backbone):
    """Parameters equal sum(p.numel()); mult-adds count every convolution (EfficientNet-Lite's padded ones too)."""
    import re

    from covidscan.config import load_config
    from covidscan.summary import model_for, summary_table, totals

    model, _, _ = model_for(load_config(None, [f"model.backbone={backbone}", "model.weights=none"]))
    table = summary_table(model, 96)
    total = sum(p.numel() for p in model.parameters())
    assert f"Total params: {total:,}" in table
    gmacs = float(re.search(r"Total mult-adds: ([0-9.]+) G", table).group(1))
    params, macs = totals(model, 96)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert params == total and gmacs == pytest.approx(macs / 1e9, abs=1e-3) and macs > 1e7
    assert macs > sum(c.weight.numel() for c in convs)  # every convolution counted at least once per output pixel


def test_every_command_and_argument_says_what_it_is_with_an_example():
    parser = build_parser()
    for name, sp in parser._subparsers._group_actions[0].choices.items():  # noqa: SLF001
        missing = [a.dest for a in sp._actions if a.dest != "help" and not a.help]  # noqa: SLF001
        assert missing == [], f"{name}: arguments without help: {missing}"
        assert "Example: covidscan " in (sp.description or ""), f"{name}: no example in --help"

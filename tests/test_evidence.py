"""Evidence you can trust: what a model trained on is recorded, and every figure on those images says so."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from covidscan.checkpoint import load_checkpoint, save_checkpoint
from covidscan.cli import main
from covidscan.data import read_split
from covidscan.metrics import operating_points, wilson_interval
from covidscan.provenance import NEAR, fingerprints, merge_records, overlap, provenance_record, thumbnails
from tests.conftest import make_folder_dataset


def unlike_images(root: Path, classes=("covid", "pneumonia", "normal"), per_class=4, size=48, seed=7) -> Path:
    """Scans no training image resembles: random low-frequency fields, each its own pattern."""
    rng = np.random.default_rng(seed)
    for label in classes:
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            coarse = rng.random((5, 5))
            img = Image.fromarray((coarse * 255).astype(np.uint8), mode="L").resize((size, size), Image.BICUBIC)
            img.save(root / label / f"new_{i}.png")
    return root


def test_fingerprints_find_exact_and_resized_copies_and_nothing_else():
    rng = np.random.default_rng(0)
    base = torch.from_numpy((rng.random((6, 1, 64, 64)) * 255).astype(np.uint8))
    smooth = torch.nn.functional.avg_pool2d(base.float(), 9, stride=1, padding=4).round().to(torch.uint8)
    rec = provenance_record(fingerprints(smooth[:3]), fingerprints(smooth[3:5]), 64)
    assert rec["hash"].shape == (5,) and rec["thumb"].shape == (5, 1024) and rec["subset"].tolist() == [0, 0, 0, 1, 1]
    # a copy of a training image, a copy of a validation image, a brightened copy (near-duplicate) and a new image
    brighter = (smooth[1].float() * 0.8 + 20).round().to(torch.uint8)
    ov = overlap(rec, fingerprints(torch.stack([smooth[0], smooth[4], brighter, smooth[5]])))
    assert ov.per_image == ["train", "val", "near-train", ""]
    assert (ov.train, ov.val, ov.near, ov.external) == (1, 1, 1, False)
    assert ov.max_correlation[2] >= NEAR > ov.max_correlation[3]
    clean = overlap(rec, fingerprints(smooth[5:]))
    assert clean.external and "none was seen in training" in clean.line()
    unknown = overlap(None, fingerprints(smooth[5:]))
    assert not unknown.checked and not unknown.external and "cannot be checked" in unknown.line()


def test_thumbnail_correlation_is_the_pearson_correlation_of_the_thumbnails():
    rng = np.random.default_rng(1)
    a, b = (torch.from_numpy((rng.random((1, 1, 64, 64)) * 255).astype(np.uint8)) for _ in range(2))
    mix = ((a.float() + b.float()) / 2).round().to(torch.uint8)
    ta, tm = thumbnails(torch.cat([a, mix])).float()
    got = float(ta @ tm / (ta.norm() * tm.norm()))
    pa = torch.nn.functional.adaptive_avg_pool2d(a.float(), 32).flatten().numpy()
    pm = torch.nn.functional.adaptive_avg_pool2d(mix.float(), 32).flatten().numpy()
    assert got == pytest.approx(float(np.corrcoef(pa, pm)[0, 1]), abs=0.01)


def test_merged_record_counts_an_image_trained_by_any_member_as_training():
    imgs = torch.from_numpy((np.random.default_rng(2).random((4, 1, 32, 32)) * 255).astype(np.uint8))
    a = provenance_record(fingerprints(imgs[:2]), fingerprints(imgs[2:3]), 32)
    b = provenance_record(fingerprints(imgs[2:3]), fingerprints(imgs[3:]), 64)  # image 2: val in a, train in b
    m = merge_records([a, b])
    assert len(m["hash"]) == 4 and m["image_size"] == 64
    assert overlap(m, fingerprints(imgs)).per_image == ["train", "train", "train", "val"]
    assert merge_records([a, None]) is None


def test_training_records_its_images_and_evaluate_says_what_it_saw(trained_run, tmp_path, capsys):
    result, data = trained_run
    obj = load_checkpoint(result.best_checkpoint)
    split = read_split(result.out / "split.csv")
    rec = obj["provenance"]
    assert int((rec["subset"] == 0).sum()) == len(split.indices("train"))
    assert int((rec["subset"] == 1).sum()) == len(split.indices("val"))
    # the whole dataset (the README's old mistake): every training and validation image is named
    assert main(["evaluate", "--checkpoint", str(result.best_checkpoint), "--data", str(data), "--out", str(tmp_path / "all"),
                 "--bootstrap", "20", "--quiet"]) == 0  # fmt: skip
    m = json.loads((tmp_path / "all" / "metrics.json").read_text())
    assert m["overlap"]["train"] == len(split.indices("train")) and m["overlap"]["val"] == len(split.indices("val"))
    assert m["overlap"]["external"] is False
    report = (tmp_path / "all" / "report.md").read_text()
    assert "NOT an external evaluation" in report and "overstate" in report
    rows = list(csv.DictReader(open(tmp_path / "all" / "predictions.csv")))
    train_files = {Path(split.index.records[i].path).name for i in split.indices("train")}
    assert {Path(r["file"]).name for r in rows if r["seen"] == "train"} == train_files
    # scans the model never saw: external
    new = unlike_images(tmp_path / "new")
    assert main(["evaluate", "--checkpoint", str(result.best_checkpoint), "--data", str(new), "--out", str(tmp_path / "ext"),
                 "--bootstrap", "20", "--quiet"]) == 0  # fmt: skip
    m = json.loads((tmp_path / "ext" / "metrics.json").read_text())
    assert m["overlap"]["external"] is True and m["overlap"]["images"] == 12
    assert "none was seen in training" in (tmp_path / "ext" / "report.md").read_text()


def test_a_resized_reencoded_copy_of_a_training_image_is_a_near_duplicate(trained_run, tmp_path):
    from covidscan.evaluation import evaluate

    result, data = trained_run
    split = read_split(result.out / "split.csv")
    src = split.index.records[split.indices("train")[0]]
    (tmp_path / "copy" / src.label).mkdir(parents=True)
    Image.open(src.path).resize((61, 57), Image.LANCZOS).save(tmp_path / "copy" / src.label / "renamed.jpg", quality=85)
    r = evaluate(result.best_checkpoint, tmp_path / "copy", n_boot=0)
    assert (r.overlap["train"], r.overlap["near_duplicates"], r.external) == (0, 1, False)


def test_calibrate_refuses_training_images_unless_allowed_and_reports_intervals(trained_run, tmp_path, capsys):
    result, data = trained_run
    out = tmp_path / "cal.pt"
    args = ["calibrate", "--checkpoint", str(result.best_checkpoint), "--data", str(data), "--out", str(out), "--bootstrap", "50"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "training split" in err and "--allow-training-images" in err and not out.exists()
    assert main(args + ["--allow-training-images"]) == 0
    printed = capsys.readouterr().out
    assert "95% interval" in printed and "warning: only 10 positives" in printed
    t = load_checkpoint(out)["meta"].threshold
    assert t["training_images_allowed"] is True and t["overlap"]["external"] is False
    lo, hi = t["sensitivity_ci95"]
    assert lo <= t["sensitivity"] <= hi and (lo, hi) == pytest.approx(wilson_interval(round(t["sensitivity"] * 10), 10))
    assert t["value_ci95"][0] <= t["value"] <= t["value_ci95"][1]
    assert "provenance" in load_checkpoint(out)  # a calibrated model still knows what it trained on


def test_checkpoint_without_a_record_loads_and_says_overlap_cannot_be_checked(trained_run, tmp_path):
    from covidscan.evaluation import evaluate

    result, data = trained_run
    obj = load_checkpoint(result.best_checkpoint)
    save_checkpoint(tmp_path / "old.pt", obj["state_dict"], obj["meta"])  # as covidscan 0.2 wrote them
    r = evaluate(tmp_path / "old.pt", unlike_images(tmp_path / "new"), n_boot=0)
    assert r.overlap["checked"] is False and not r.external and "cannot be checked" in r.overlap["summary"]
    raw = torch.load(result.best_checkpoint, weights_only=True)
    bad = dict(raw, provenance={"hash": torch.zeros(3, dtype=torch.int64), "thumb": torch.zeros(2, 5), "subset": []})
    torch.save(bad, tmp_path / "bad.pt")
    from covidscan.errors import CheckpointError

    with pytest.raises(CheckpointError, match="provenance"):
        load_checkpoint(tmp_path / "bad.pt")


def test_wilson_interval_matches_the_textbook_value():
    lo, hi = wilson_interval(8, 10)
    assert (round(lo, 3), round(hi, 3)) == (0.490, 0.943)  # Newcombe 1998, 8 of 10
    assert all(np.isnan(v) for v in wilson_interval(0, 0))  # undefined


def test_operating_points_by_hand():
    # positives 0.9 0.8 0.7 0.4; negatives 0.6 0.5 0.3 0.2 0.1 0.05 0.02 0.01 0.005 0.001
    pos = [0.9, 0.8, 0.7, 0.4]
    neg = [0.6, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.001]
    y = np.array([1] * 4 + [0] * 10, dtype=bool)
    s = np.array(pos + neg)
    op = operating_points(y, s, n_boot=50)
    # specificity >= 90%: at most one negative at or above t -> t = 0.7 (0.6 above it only): sensitivity 3/4
    assert op["sensitivity@specificity=0.9"]["value"] == pytest.approx(0.75)
    # specificity >= 95%: no negative above t -> t = 0.7: 3/4
    assert op["sensitivity@specificity=0.95"]["value"] == pytest.approx(0.75)
    # sensitivity >= 90%: every positive -> t = 0.4: negatives below 0.4: 8 of 10
    assert op["specificity@sensitivity=0.9"]["value"] == pytest.approx(0.8)
    lo, hi = op["specificity@sensitivity=0.9"]["ci95"]
    assert lo <= 0.8 <= hi


@pytest.mark.parametrize(
    "change, message",
    [
        ({"preprocess": {"image_size": 64, "mean": [0.5] * 3, "std": [float("nan")] * 3}}, "preprocessing is not valid"),
        ({"preprocess": {"image_size": 64, "mean": [float("inf")] * 3, "std": [0.5] * 3}}, "preprocessing is not valid"),
        ({"threshold": {"class": "covid", "value": "0.3"}}, "threshold"),
        ({"threshold": {"class": "covid", "value": [0.3]}}, "threshold"),
        ({"threshold": {"class": "covid", "value": float("nan")}}, "threshold"),
        ({"versions": {"covidscan": 3}}, "versions"),
    ],
)
def test_checkpoint_values_of_the_wrong_kind_are_one_line_errors(trained_run, tmp_path, capsys, change, message):
    from covidscan.errors import CheckpointError

    result, _ = trained_run
    obj = torch.load(result.best_checkpoint, weights_only=True)
    save_checkpoint(tmp_path / "bad.pt", obj["state_dict"], {**obj["meta"], **change})
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "bad.pt")
    capsys.readouterr()
    img = next(make_folder_dataset(tmp_path / "d", per_class=1, size=32).rglob("*.png"))
    assert main(["predict", "--checkpoint", str(tmp_path / "bad.pt"), str(img)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


@pytest.mark.parametrize(
    "option, value", [("crop_scale", 0.5), ("gamma", 0.4), ("blur", 0.3), ("sharpen", 0.3), ("jpeg", 0.5), ("noise", 3.0)]
)
def test_device_data_refuses_augmentations_its_batch_path_lacks(option, value):
    from covidscan.config import load_config
    from covidscan.errors import ConfigError

    load_config(None, ["train.device_data=true", "augment.brightness=0.3"])  # what the batch path has: accepted
    with pytest.raises(ConfigError, match=f"augment.{option}={value:g}.*train.device_data=false"):
        load_config(None, ["train.device_data=true", f"augment.{option}={value}"])
    load_config(None, ["train.device_data=true", f"augment.{option}={value}", "augment.enabled=false"])  # nothing dropped
    with pytest.raises(ConfigError, match="device_data"):
        load_config(Path(__file__).resolve().parents[1] / "configs" / "xray_recommended.yaml", ["train.device_data=true"])


def test_the_same_training_command_twice_gives_bit_identical_weights(tmp_path):
    """Same data, config and seed on the same machine (CPU): the same bytes in every weight, with the recommended
    recipe's moving parts on (augmentation incl. the source-cue breakers, balanced sampler, precise BN)."""
    from covidscan.training import train
    from tests.conftest import tiny_config

    data = make_folder_dataset(tmp_path / "d", per_class=6, size=48)
    aug = {
        "enabled": True,
        "crop_scale": 0.5,
        "gamma": 0.4,
        "blur": 0.3,
        "sharpen": 0.3,
        "jpeg": 0.5,
        "noise": 3.0,
        "brightness": 0.3,
    }
    cfg = tiny_config(train={"epochs": 2, "sampler": "balanced", "precise_bn": 8}, augment=aug)
    a, b = (load_checkpoint(train(cfg, data, tmp_path / run).best_checkpoint)["state_dict"] for run in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = load_checkpoint(train(tiny_config(train={"epochs": 2, "sampler": "balanced", "precise_bn": 8, "seed": 1}, augment=aug),
                              data, tmp_path / "c").best_checkpoint)["state_dict"]  # fmt: skip
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the seed is not ignored

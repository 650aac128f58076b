"""Site adaptation: BatchNorm statistics from unlabelled scans, a threshold from a few labelled ones."""

import json

import numpy as np
import pytest
import torch

from covidscan.adapt import adapt_batchnorm, threshold_for_sensitivity
from covidscan.checkpoint import load_checkpoint, model_from_checkpoint
from covidscan.cli import main
from covidscan.data.dataset import ImageStore
from covidscan.data.manifest import Record
from covidscan.errors import DataError
from covidscan.inference import Predictor
from tests.conftest import make_folder_dataset


def test_threshold_gives_the_requested_sensitivity():
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(200, bool), np.zeros(300, bool)]
    score = np.r_[rng.beta(5, 2, 200), rng.beta(2, 5, 300)]
    for target in (0.8, 0.9, 0.95, 1.0):
        t = threshold_for_sensitivity(y, score, target)
        achieved = (score[y] >= t["value"]).mean()
        assert achieved >= target and t["sensitivity"] == pytest.approx(achieved)
        # the highest such threshold: any higher one misses the target
        assert (score[y] > t["value"]).mean() < target
        assert t["specificity"] == pytest.approx((score[~y] < t["value"]).mean())
    # hand-computed: positives 0.9, 0.8, 0.7, 0.6; 75% sensitivity needs 3 of them -> t = 0.7
    t = threshold_for_sensitivity([1, 1, 1, 1, 0, 0], [0.9, 0.8, 0.7, 0.6, 0.65, 0.1], 0.75)
    assert t["value"] == 0.7 and t["specificity"] == 1.0
    with pytest.raises(DataError, match="no covid images"):
        threshold_for_sensitivity([0, 0], [0.2, 0.4], 0.9)


def test_bn_adaptation_changes_running_statistics_only(trained_run, tmp_path):
    result, data = trained_run
    model, meta = model_from_checkpoint(load_checkpoint(result.best_checkpoint))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # a "new site": the same kind of scans, brighter and lower-contrast
    site = make_folder_dataset(tmp_path / "site", per_class=4, size=48, manifest=False, seed=5)
    for p in site.rglob("*.png"):
        from PIL import Image

        arr = np.asarray(Image.open(p), dtype=np.float32)
        Image.fromarray((arr * 0.5 + 100).astype(np.uint8)).save(p)
    records = [Record(path=p, label="covid") for p in sorted(site.rglob("*.png"))]
    n = adapt_batchnorm(model, ImageStore(records, meta.preprocess), device="cpu")
    assert n == 12
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed)
    bn_weights = [k for k in before if k.endswith(".weight") or k.endswith(".bias")]
    assert all(torch.equal(before[k], after[k]) for k in bn_weights)


def test_calibrate_and_adapt_commands_and_predict_uses_the_threshold(trained_run, tmp_path, capsys):
    result, data = trained_run
    cal = tmp_path / "calibrated.pt"
    assert main(["calibrate", "--checkpoint", str(result.best_checkpoint), "--data", str(data), "--sensitivity", "0.9",
                 "--out", str(cal), "--allow-training-images"]) == 0  # fmt: skip
    meta = load_checkpoint(cal)["meta"]
    t = meta.threshold
    assert t["class"] == "covid" and t["sensitivity"] >= 0.9 and t["target_sensitivity"] == 0.9
    pred = Predictor.from_checkpoint(cal, device="cpu")
    img = next((data / "covid").glob("*.png"))
    p = pred.predict(img)
    assert p.decision == {"class": "covid", "threshold": t["value"], "positive": p.probabilities["covid"] >= t["value"]}
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(cal), str(img), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["decision"]["threshold"] == pytest.approx(t["value"])
    # the uncalibrated checkpoint gives no decision
    assert Predictor.from_checkpoint(result.best_checkpoint, device="cpu").predict(img).decision is None
    out = tmp_path / "adapted.pt"
    assert main(["adapt", "--checkpoint", str(result.best_checkpoint), str(data / "normal"), "--out", str(out)]) == 0
    assert load_checkpoint(out)["meta"].adaptation["images"] == 10
    # a packed folder of the same images (made with the model's preprocessing) gives the same statistics
    from covidscan.data.pack import pack

    on_files, on_pack = tmp_path / "adapted_all.pt", tmp_path / "adapted_from_pack.pt"
    assert main(["adapt", "--checkpoint", str(result.best_checkpoint), str(data), "--out", str(on_files)]) == 0
    pack(data, tmp_path / "packed", load_checkpoint(out)["meta"].preprocess)
    assert main(["adapt", "--checkpoint", str(result.best_checkpoint), str(tmp_path / "packed"), "--out", str(on_pack)]) == 0
    assert load_checkpoint(on_pack)["meta"].adaptation["images"] == load_checkpoint(on_files)["meta"].adaptation["images"] == 30
    a, b = load_checkpoint(on_files)["state_dict"], load_checkpoint(on_pack)["state_dict"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    capsys.readouterr()
    bad = [
        "adapt",
        "--checkpoint",
        str(result.best_checkpoint),
        str(tmp_path / "packed"),
        str(data),
        "--out",
        str(tmp_path / "x.pt"),
    ]
    assert main(bad) == 2 and "packed folder is adapted on alone" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_ensemble_equals_the_mean_of_its_members(tmp_path, capsys):
    from covidscan.export import export_checkpoint
    from covidscan.training import train
    from tests.conftest import tiny_config

    data = make_folder_dataset(tmp_path / "d", per_class=6, size=48)
    a = train(tiny_config(train={"epochs": 1}), data, tmp_path / "a").best_checkpoint
    b = train(tiny_config(train={"epochs": 1, "seed": 1}, model={"head": "paper"}), data, tmp_path / "b").best_checkpoint
    assert main(["ensemble", str(a), str(b), "--out", str(tmp_path / "ens.pt")]) == 0
    ens = Predictor.from_checkpoint(tmp_path / "ens.pt", device="cpu")
    members = [Predictor.from_checkpoint(p, device="cpu") for p in (a, b)]
    for img in sorted(data.rglob("*.png"))[:4]:
        got = ens.predict(img).probabilities
        want = {n: np.mean([m.predict(img).probabilities[n] for m in members]) for n in ens.class_names}
        assert got == pytest.approx(want, abs=1e-6)
    cam, cls = ens.explain(__import__("covidscan").read_image(img))
    assert cam.shape == (48, 48) and np.isfinite(cam).all()
    assert export_checkpoint(tmp_path / "ens.pt", tmp_path / "ens.onnx") < 1e-4
    # members trained at another input size: the ensemble reads at the largest, the smaller member gets
    # that tensor resized to its own size (the mean of exactly that), close to its own prediction
    c = train(tiny_config(train={"epochs": 1}, data={"image_size": 32}), data, tmp_path / "c").best_checkpoint
    assert main(["ensemble", str(c), str(a), "--out", str(tmp_path / "mixed.pt")]) == 0
    mixed = Predictor.from_checkpoint(tmp_path / "mixed.pt", device="cpu")
    assert mixed.meta.preprocess.image_size == 64 and [m["image_size"] for m in mixed.meta.members] == [32, 64]
    (mc, _), (ma, _) = (model_from_checkpoint(load_checkpoint(p)) for p in (c, a))
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = (mc(torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear")).softmax(1) + ma(x).softmax(1)) / 2
        assert mixed.model(x).softmax(1) == pytest.approx(want, abs=1e-6)
        assert not torch.allclose(mc(x).softmax(1), mc(x[..., :32, :32]).softmax(1))  # the size is not ignored
    alone = Predictor.from_checkpoint(c, device="cpu")
    for img in sorted(data.rglob("*.png"))[:4]:
        own = (alone.predict(img).probabilities["covid"] + members[0].predict(img).probabilities["covid"]) / 2
        assert mixed.predict(img).probabilities["covid"] == pytest.approx(own, abs=0.05)
    assert export_checkpoint(tmp_path / "mixed.pt", tmp_path / "mixed.onnx") < 1e-4
    from covidscan.card import model_card

    card = model_card(tmp_path / "mixed.pt")
    assert "efficientnet_lite0/linear at 32 px" in card and "efficientnet_lite0/linear at 64 px" in card
    # members of another preprocessing (here the border crop) cannot be averaged on one input
    d = train(tiny_config(train={"epochs": 1}, data={"crop": 0.1}), data, tmp_path / "e").best_checkpoint
    capsys.readouterr()
    assert main(["ensemble", str(a), str(d), "--out", str(tmp_path / "bad.pt")]) == 2
    assert "preprocessing differs from the first member in crop" in capsys.readouterr().err


def test_train_ensemble_command_shares_one_split(tmp_path, capsys):
    data = make_folder_dataset(tmp_path / "d", per_class=6, size=40)
    common = "model:\n  weights: none\n  backbone: efficientnet_lite0\ndata:\n  image_size: 40\naugment:\n  enabled: false\n"
    (tmp_path / "a.yaml").write_text(common + "train:\n  epochs: 1\n  batch_size: 4\n")
    (tmp_path / "b.yaml").write_text(
        common.replace("efficientnet_lite0", "efficientnet_lite0\n  freeze_backbone: true")
        + "train:\n  epochs: 2\n  batch_size: 4\n  lr: 0.01\n"
    )
    args = ["train-ensemble", "--config", str(tmp_path / "a.yaml"), "--config", str(tmp_path / "b.yaml"),
            "--data", str(data), "--out", str(tmp_path / "ens"), "--quiet"]  # fmt: skip
    assert main(args) == 0
    assert "checkpoint: " + str(tmp_path / "ens" / "ensemble.pt") in capsys.readouterr().out
    from covidscan.data import read_split

    splits = [read_split(tmp_path / "ens" / f / "split.csv") for f in ("member0", "member1", ".")]
    assert [r.path for r in splits[0].index.records] == [r.path for r in splits[2].index.records]
    assert splits[0].assignment == splits[1].assignment == splits[2].assignment
    meta = load_checkpoint(tmp_path / "ens" / "ensemble.pt")["meta"]
    assert meta.backbone == "ensemble" and len(meta.members) == 2 and meta.members[1]["config"]["model"]["freeze_backbone"]
    assert main(args) == 2  # an ensemble is never replaced silently
    assert main(["evaluate", "--checkpoint", str(tmp_path / "ens" / "ensemble.pt"), "--out", str(tmp_path / "ev"),
                 "--bootstrap", "10", "--quiet"]) == 0  # fmt: skip
    # one recipe, several seeds: a seed ensemble whose members differ only in train.seed
    capsys.readouterr()
    seeds = ["train-ensemble", "--config", str(tmp_path / "a.yaml"), "--seeds", "3", "4", "--data", str(data),
             "--out", str(tmp_path / "seeds"), "--quiet"]  # fmt: skip
    assert main(seeds) == 0
    assert "a.yaml seed 4: best epoch" in capsys.readouterr().out
    meta = load_checkpoint(tmp_path / "seeds" / "ensemble.pt")["meta"]
    assert [m["config"]["train"]["seed"] for m in meta.members] == [3, 4]
    w = [load_checkpoint(tmp_path / "seeds" / f"member{k}" / "best.pt")["state_dict"] for k in range(2)]
    assert any(not torch.equal(w[0][k], w[1][k]) for k in w[0])
    assert main(seeds[:3] + ["--data", str(data), "--out", str(tmp_path / "one")]) == 2  # one member is no ensemble


def test_precise_bn_changes_statistics_only_and_is_the_data_average(tmp_path):
    from covidscan.predict import batchnorm_statistics
    from covidscan.training import train
    from tests.conftest import tiny_config

    data = make_folder_dataset(tmp_path / "d", per_class=8, size=40)
    plain = train(tiny_config(train={"epochs": 2}), data, tmp_path / "plain")
    precise = train(tiny_config(train={"epochs": 2, "precise_bn": 1000}), data, tmp_path / "precise")
    a = load_checkpoint(plain.last_checkpoint)["state_dict"]
    b = load_checkpoint(precise.last_checkpoint)["state_dict"]
    stats = [k for k in a if k.endswith(("running_mean", "running_var"))]
    others = [k for k in a if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert all(torch.equal(a[k], b[k]) for k in others)  # training itself uses batch statistics: same weights
    assert any(not torch.allclose(a[k], b[k]) for k in stats)
    # the saved statistics are the plain average over the training images
    model, meta = model_from_checkpoint(load_checkpoint(precise.last_checkpoint))
    from covidscan.data import read_split
    from covidscan.data.dataset import ImageStore

    train_part = read_split(tmp_path / "precise" / "split.csv").subset("train")
    store = ImageStore(train_part.records, meta.preprocess)
    batchnorm_statistics(model, store.images, meta.preprocess, batch_size=64)
    again = model.state_dict()

    def worst(x):  # largest relative difference to the saved statistics
        return max(((x[k] - b[k]).abs() / (b[k].abs() + 1e-3)).max().item() for k in stats)

    assert worst(again) < 1e-2 < 0.1 < worst(a), (worst(again), worst(a))  # float noise vs a real difference


def test_test_time_augmentation_is_the_mean_with_the_mirror_image(trained_run, tmp_path):
    result, data = trained_run
    plain = Predictor.from_checkpoint(result.best_checkpoint, device="cpu")
    tta = Predictor.from_checkpoint(result.best_checkpoint, device="cpu", tta=True)
    from PIL import Image

    img = next((data / "covid").glob("*.png"))
    Image.open(img).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "mirror.png")
    a, b = plain.predict(img).probabilities, plain.predict(tmp_path / "mirror.png").probabilities
    got = tta.predict(img).probabilities
    assert got == pytest.approx({n: (a[n] + b[n]) / 2 for n in a}, abs=1e-5)
    from covidscan.evaluation import evaluate

    r = evaluate(result.best_checkpoint, data, n_boot=0, tta=True)
    assert "test-time augmentation" in r.evaluated_on and r.metrics["n"] == 30

import csv
import json
from collections import Counter

import numpy as np
import pytest
import torch

from covidscan.data import load_dataset
from covidscan.data.dataset import balanced_weights
from covidscan.data.transforms import Preprocess, to_gray_uint8
from covidscan.models import get_backbone
from tests.conftest import chest_like, make_folder_dataset, tiny_config


def test_merge_keeps_sources_and_manifest_source_column(tmp_path):
    a = make_folder_dataset(tmp_path / "hospA", per_class=4, size=32)  # manifest with a source column
    b = make_folder_dataset(tmp_path / "hospB", per_class=4, size=32, manifest=False)  # folder: source = folder name
    index = load_dataset([a, b])
    srcs = index.sources()
    assert srcs["covid"] == {"src_covid": 4, "hospB": 4} and srcs["pneumonia"] == {"src_shared": 4, "hospB": 4}
    assert index.single_source_classes() == []


def test_balanced_sampler_matches_target_proportions():
    labels = ["covid"] * 90 + ["covid"] * 10 + ["normal"] * 50
    sources = ["A"] * 90 + ["B"] * 10 + ["C"] * 50
    w = balanced_weights(labels, sources)
    draws = torch.multinomial(w, 30000, replacement=True, generator=torch.Generator().manual_seed(0))
    cells = Counter((labels[i], sources[i]) for i in draws.tolist())
    for cell in [("covid", "A"), ("covid", "B"), ("normal", "C")]:
        assert abs(cells[cell] / 30000 - 1 / 3) < 0.015, cells


def test_strata_field_that_no_training_image_has_is_one_clear_error(tmp_path):
    from covidscan.errors import DataError
    from covidscan.training import train

    data = make_folder_dataset(tmp_path / "d", per_class=6, size=32)
    cfg = tiny_config(train={"sampler": "balanced", "strata": "veiw"})
    with pytest.raises(DataError, match="train.strata='veiw': no training image has that manifest field"):
        train(cfg, data, tmp_path / "run")
    assert not (tmp_path / "run" / "best.pt").exists()


def test_sampler_strata_split_cells_by_a_manifest_field():
    from types import SimpleNamespace

    from covidscan.data.manifest import Record
    from covidscan.training.data import epoch_order

    def rec(label, view, column=False):
        row = {"view": view} if column else {"source_label": f"finding=x; view={view}; age=40"}
        return Record(path=f"/x/{label}{view}", label=label, source="A", row=row)

    # COVID 90 AP + 10 PA; normal 10 AP (a manifest column) + 90 PA: the view tells the label apart
    recs = [rec("covid", "AP")] * 90 + [rec("covid", "PA")] * 10 + [rec("normal", "AP", True)] * 10
    recs += [rec("normal", "PA", True)] * 90
    assert (recs[0].attribute("view"), recs[150].attribute("VIEW"), recs[0].attribute("sex")) == ("AP", "", "")
    assert recs[150].attribute("view") == "PA"  # the column wins; source_label is the fallback

    def shares(strata):
        cfg = tiny_config(train={"sampler": "balanced", "strata": strata})
        data = SimpleNamespace(train=recs, train_records=recs)
        order = []
        for seed in range(60):
            order += epoch_order(cfg, data, torch.Generator().manual_seed(seed))
        cells = Counter((recs[i].label, recs[i].attribute("view")) for i in order)
        return {c: n / len(order) for c, n in cells.items()}

    assert shares("view") == pytest.approx(dict.fromkeys(shares("view"), 0.25), abs=0.01)  # 4 equal cells
    plain = shares("")  # label x source only: within a label, views keep their 9:1 ratio
    assert plain[("covid", "AP")] == pytest.approx(0.45, abs=0.01) and plain[("normal", "AP")] == pytest.approx(0.05, abs=0.01)


@pytest.mark.parametrize("equalize", [False, True])
@pytest.mark.parametrize("crop", [0.0, 0.1])
def test_preprocessing_options_deterministic_size_range(equalize, crop):
    pre = Preprocess.for_backbone(get_backbone("densenet121"), 64, equalize=equalize, crop=crop)
    img = chest_like(90, 3)
    img[:5, :20] = 1.0  # a white text marker in the corner
    a, b = to_gray_uint8(img, pre), to_gray_uint8(img, pre)
    assert torch.equal(a, b) and a.shape == (1, 64, 64) and a.dtype == torch.uint8
    if equalize:
        assert a.min() == 0 and a.max() == 255  # full range used
    if crop:
        assert not torch.equal(a, to_gray_uint8(img, Preprocess.for_backbone(get_backbone("densenet121"), 64)))
    assert Preprocess.from_dict(pre.to_dict()) == pre


def test_bad_crop_rejected():
    with pytest.raises(ValueError, match="crop"):
        Preprocess.for_backbone(get_backbone("densenet121"), 64, crop=0.6)


def test_loso_never_trains_on_left_out_source(tmp_path, monkeypatch):
    from covidscan.errors import DataError
    from covidscan.experiments.loso import leave_one_source_out

    a = make_folder_dataset(tmp_path / "hospA", classes=("covid", "normal"), per_class=8, size=40, manifest=False, seed=1)
    b = make_folder_dataset(tmp_path / "hospB", classes=("covid", "normal"), per_class=8, size=40, manifest=False, seed=2)
    c = make_folder_dataset(tmp_path / "hospC", classes=("covid", "normal"), per_class=8, size=40, manifest=False, seed=3)
    cfg = tiny_config(data={"task": "ct"}, train={"epochs": 1, "mixup": 0.3})
    with pytest.raises(DataError, match=r"unknown source\(s\) \['hospd'\]; known: \['hospa', 'hospb', 'hospc'\]"):
        leave_one_source_out(cfg, [a, b, c], tmp_path / "loso", sources=["hospa", "hospb+hospd"])
    assert not (tmp_path / "loso").exists()  # a typo in any fold is caught before a folder is made or a fold trains
    res = leave_one_source_out(cfg, [a, b, c], tmp_path / "loso", n_boot=20)
    assert [f["source"] for f in res["folds"]] == ["hospa", "hospb", "hospc"]
    for k, src in enumerate(["hospA", "hospB", "hospC"]):
        rows = list(csv.DictReader(open(tmp_path / "loso" / f"fold{k:02d}" / "split.csv")))
        seen = {r["file"] for r in rows if r["split"] in ("train", "val")}
        left = {r["file"] for r in rows if r["split"] == "test"}
        assert left and all(src in f for f in left)
        assert not any(src in f for f in seen), "trained on the left-out source"
    assert res["pooled"]["n"] == 48 and 0 <= res["pooled"]["covid_auroc"] <= 1
    report = (tmp_path / "loso" / "loso.md").read_text()
    assert "Pooled out-of-source" in report and "epochs=1" in report and "mixup=0.3" in report  # the recipe is named
    mean = np.mean([f["covid_auroc"] for f in res["folds"]])  # three two-class sources, each counted once
    assert f"Mean of the 3 held-out sources' COVID AUROCs, each source counted once: {mean:.3f}" in report
    for f in res["folds"]:  # per-source intervals hold their point estimate
        for key in ("covid_sensitivity", "covid_specificity", "covid_auroc"):
            lo, hi = f[f"{key}_ci"]
            assert lo - 1e-9 <= f[key] <= hi + 1e-9, (key, f)
        preds = list(csv.DictReader(open(tmp_path / "loso" / f"fold{res['folds'].index(f):02d}" / "predictions.csv")))
        assert len(preds) == f["n"] == 16

    # resume keeps finished folds: no training, same table
    import covidscan.experiments.loso as loso_mod

    def no_training(*a, **k):
        raise AssertionError("a finished fold was trained again")

    monkeypatch.setattr(loso_mod, "train", no_training)
    again = leave_one_source_out(cfg, [a, b, c], tmp_path / "loso", n_boot=20, resume=True)
    assert again["folds"] == json.loads(json.dumps(res["folds"])) and again["pooled"] == res["pooled"]
    # a changed config is not "finished": that fold is trained again
    with pytest.raises(AssertionError, match="trained again"):
        leave_one_source_out(tiny_config(data={"task": "ct"}, train={"epochs": 2}), [a, b, c], tmp_path / "loso", resume=True)
    # a truncated predictions file or an unreadable summary is not "finished" either (no crash)
    fold1 = tmp_path / "loso" / "fold01"
    lines = (fold1 / "predictions.csv").read_text().splitlines(keepends=True)
    (fold1 / "predictions.csv").write_text("".join(lines[:5]))
    with pytest.raises(AssertionError, match="trained again"):
        leave_one_source_out(cfg, [a, b, c], tmp_path / "loso", resume=True)
    (fold1 / "predictions.csv").write_text("".join(lines))
    (fold1 / "fold.json").write_text('{"fold": ')
    with pytest.raises(AssertionError, match="trained again"):
        leave_one_source_out(cfg, [a, b, c], tmp_path / "loso", resume=True)


def test_data_exclude_drops_a_source_before_splitting_in_train_and_loso(tmp_path):
    """data.exclude=kermany: no Kermany image in train, val or test, in train's split and in every loso fold."""
    from covidscan.data import exclude_sources
    from covidscan.errors import DataError
    from covidscan.experiments.loso import leave_one_source_out
    from covidscan.training import train

    kw = dict(classes=("covid", "normal"), per_class=8, size=40, manifest=False)
    a = make_folder_dataset(tmp_path / "hospA", seed=1, **kw)
    b = make_folder_dataset(tmp_path / "hospB", seed=2, **kw)
    kids = make_folder_dataset(tmp_path / "Kermany_kids", seed=3, **kw)
    index = load_dataset([a, b, kids], "ct")
    assert len(exclude_sources(index, "")) == 48
    kept = exclude_sources(index, " KERMANY ")  # case-insensitive, trimmed
    assert len(kept) == 32 and {r.source for r in kept.records} == {"hospA", "hospB"}
    with pytest.raises(DataError, match="typo matches no source"):
        exclude_sources(index, "kermany,typo")
    with pytest.raises(DataError, match="leaves no image"):
        exclude_sources(index, "hosp,kermany")

    cfg = tiny_config(data={"task": "ct", "exclude": "kermany"}, train={"epochs": 1})
    train(cfg, [a, b, kids], tmp_path / "run")
    rows = list(csv.DictReader(open(tmp_path / "run" / "split.csv")))
    assert len(rows) == 32 and not any("Kermany" in r["file"] for r in rows)
    res = leave_one_source_out(cfg, [a, b, kids], tmp_path / "loso", n_boot=0)
    assert [f["source"] for f in res["folds"]] == ["hospa", "hospb"]  # no fold for the excluded source
    for k in range(2):
        rows = list(csv.DictReader(open(tmp_path / "loso" / f"fold{k:02d}" / "split.csv")))
        assert len(rows) == 32 and not any("Kermany" in r["file"] for r in rows)
    assert "data exclude=kermany" in (tmp_path / "loso" / "loso.md").read_text()


def test_balanced_training_runs(tmp_path):
    from covidscan.training import train

    data = make_folder_dataset(tmp_path / "d", per_class=6, size=40)
    res = train(
        tiny_config(train={"epochs": 1, "sampler": "balanced"}, data={"equalize": True, "crop": 0.05}), data, tmp_path / "run"
    )
    from covidscan.checkpoint import load_checkpoint

    pre = load_checkpoint(res.best_checkpoint)["meta"]["preprocess"]
    assert pre["equalize"] is True and pre["crop"] == 0.05
    assert np.isfinite(res.history[0]["train_loss"])
    # the balanced sampler also drives the frozen-backbone feature fast path
    res = train(tiny_config(train={"epochs": 1, "sampler": "balanced"}, model={"freeze_backbone": True}), data, tmp_path / "r2")
    assert np.isfinite(res.history[0]["train_loss"])


def test_batch_augment_identity_flip_and_per_image_draws():
    from types import SimpleNamespace

    from covidscan.data.transforms import batch_augment

    x = torch.from_numpy((np.random.default_rng(0).uniform(size=(4, 1, 32, 32)) * 255).astype(np.uint8))
    none = SimpleNamespace(rotation=0.0, zoom=0.0, shift=0.0, hflip=0.0, brightness=0.0, contrast=0.0)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(batch_augment(x, none, gen), x)
    flip = SimpleNamespace(**{**vars(none), "hflip": 1.0})
    assert torch.equal(batch_augment(x, flip, gen), x.flip(-1))
    # a pure shift moves content right by shift * side (here 25% of 32 = 8 pixels) or left
    bar = torch.zeros(1, 1, 32, 32, dtype=torch.uint8)
    bar[..., 12:20] = 255
    shifted = batch_augment(bar.repeat(64, 1, 1, 1), SimpleNamespace(**{**vars(none), "shift": 0.25}), gen)
    cols = (shifted[:, 0, 16].float() > 127).float()
    centres = (cols * torch.arange(32)).sum(1) / cols.sum(1).clamp_min(1)
    assert (centres - 15.5).abs().max() <= 8.5 and (centres - 15.5).abs().max() > 4  # moved, within the range
    assert len({round(c, 1) for c in centres.tolist()}) > 10  # every image has its own draw
    full = SimpleNamespace(rotation=10.0, zoom=0.1, shift=0.1, hflip=0.5, brightness=0.3, contrast=0.3)
    out = batch_augment(x, full, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(out, batch_augment(x, full, torch.Generator().manual_seed(1)))  # seeded


def test_device_data_path_trains(tmp_path):
    from covidscan.training import train

    data = make_folder_dataset(tmp_path / "d", per_class=8, size=40)
    cfg = tiny_config(train={"epochs": 2, "device_data": True}, augment={"enabled": True})
    res = train(cfg, data, tmp_path / "run")
    assert len(res.history) == 2 and all(np.isfinite(h["train_loss"]) for h in res.history)
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"] * 1.5
    # resume equals uninterrupted on this path too (seeded per epoch)
    part = train(cfg, data, tmp_path / "part", stop_after_epoch=1)
    assert len(part.history) == 1
    resumed = train(None, None, tmp_path / "part", resume=True)
    from covidscan.checkpoint import load_checkpoint

    a, b = load_checkpoint(res.last_checkpoint)["state_dict"], load_checkpoint(resumed.last_checkpoint)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sharpen_raises_fine_detail_and_blur_lowers_it():
    """augment.sharpen (a sharper CT kernel) and augment.blur (a softer one) move the image's fine detail in
    opposite directions, keep its size, type and mean grey level, and are left out of the pipeline when 0."""
    from torchvision.transforms import v2

    from covidscan.config import AugmentConfig
    from covidscan.data.transforms import RandomDownUp, RandomSharpen, build_augment

    img = torch.from_numpy((chest_like(64, 0) * 255).round().astype(np.uint8))[None]

    def detail(x):  # mean absolute Laplacian: the high-frequency energy a reconstruction kernel sets
        x = x.float()[0]
        return (4 * x[1:-1, 1:-1] - x[:-2, 1:-1] - x[2:, 1:-1] - x[1:-1, :-2] - x[1:-1, 2:]).abs().mean().item()

    torch.manual_seed(0)
    sharp, soft = RandomSharpen()(img), RandomDownUp(1.0)(img)
    assert sharp.shape == img.shape and sharp.dtype == torch.uint8
    assert detail(sharp) > 1.4 * detail(img) > 1.4 * detail(soft)
    assert abs(sharp.float().mean() - img.float().mean()) < 2  # the grey level stays: only the texture changes
    draws = {round(detail(RandomSharpen()(img)), 2) for _ in range(8)}
    assert len(draws) > 4  # the strength is drawn per image

    def sharpening(**kw):  # the probability the pipeline applies RandomSharpen with (None: not in it)
        steps = [t for t in build_augment(AugmentConfig(**kw), 64).transforms if isinstance(t, v2.RandomApply)]
        return next((t.p for t in steps if isinstance(t.transforms[0], RandomSharpen)), None)

    assert sharpening(sharpen=0.3) == 0.3 and sharpening() is None


def test_sharpen_probability_out_of_range_is_refused():
    from covidscan.config import load_config
    from covidscan.errors import ConfigError

    assert load_config(None, ["augment.sharpen=0.3"]).augment.sharpen == 0.3
    with pytest.raises(ConfigError, match="sharpen"):
        load_config(None, ["augment.sharpen=1.5"])


def test_noise_masks_fine_texture_with_the_requested_spread():
    """augment.noise=S adds independent Gaussian noise of S grey levels to every training image (the masking
    counterpart to sharpening: each source's own fine texture is drowned rather than amplified); the mean grey
    level stays, values are clipped to uint8, each call draws anew, and it is left out of the pipeline at 0."""
    from covidscan.config import AugmentConfig
    from covidscan.data.transforms import RandomNoise, build_augment

    img = torch.full((1, 96, 96), 128, dtype=torch.uint8)
    torch.manual_seed(0)
    a, b = RandomNoise(6.0)(img), RandomNoise(6.0)(img)
    assert a.shape == img.shape and a.dtype == torch.uint8
    diff = a.float() - img.float()
    assert 5.5 < diff.std().item() < 6.5 and abs(diff.mean().item()) < 0.3
    assert not torch.equal(a, b)  # drawn per call, not a fixed pattern the model could learn
    edge = RandomNoise(6.0)(torch.full((1, 32, 32), 254, dtype=torch.uint8))
    assert int(edge.max()) == 255 and int(edge.min()) > 200  # clipped at white, not wrapped round to black

    def noise_steps(**kw):
        return [t for t in build_augment(AugmentConfig(**kw), 64).transforms if isinstance(t, RandomNoise)]

    assert [t.std for t in noise_steps(noise=6.0)] == [6.0] and noise_steps() == []


def test_pooled_report_also_counts_each_source_once(tmp_path):
    """The pooled AUROC weighs held-out sources by size, so one large source can decide it; the report adds the
    plain mean of the folds' AUROCs over the folds that hold both classes (one-class folds have none)."""
    from covidscan.experiments.pooling import pool, report_markdown

    def fold(name, labels, p):
        d = tmp_path / "run" / name
        d.mkdir(parents=True)
        with open(d / "predictions.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["file", "label", "group", "p_covid"])
            w.writerows([f"{name}/{i}.png", lab, f"g{i}", q] for i, (lab, q) in enumerate(zip(labels, p)))

    small = ["covid"] * 5 + ["normal"] * 5
    fold("fold00", small, [0.9] * 5 + [0.1] * 5)  # a small source ranked perfectly: AUROC 1
    big = ["covid"] * 100 + ["normal"] * 100
    rng = np.random.default_rng(0)
    fold("fold01", big, np.r_[rng.uniform(0.2, 0.6, 100), rng.uniform(0.4, 0.8, 100)])  # a large one, reversed
    fold("fold02", ["normal"] * 6, [0.3] * 6)  # one class: no AUROC of its own
    r = pool([tmp_path / "run"], n_boot=0)
    per = [f["auroc"] for f in r["folds"]]
    assert per[0] == 1.0 and per[1] < 0.3 and np.isnan(per[2])
    assert r["source_mean"]["folds"] == 2 and r["source_mean"]["auroc"] == pytest.approx((per[0] + per[1]) / 2)
    assert r["pooled"]["auroc"] < r["source_mean"]["auroc"] - 0.2  # the large source pulls the pooled figure down
    assert (
        f"| mean of the 2 folds with both classes (each source counted once) | | | {r['source_mean']['auroc']:.3f} |"
        in report_markdown(r)
    )


def test_loso_by_patient_holds_out_one_patient_and_keeps_the_rest_of_its_hospital(tmp_path, monkeypatch):
    """``covidscan loso --field patient_id --sources ...`` (the issue's "each ct-volumes patient held out in turn"):
    each fold's test set is exactly one patient's images, the same hospital's other patients stay in training,
    and the report, the pooled figure and a resumed run name patients, not sources."""
    from covidscan.cli import main
    from covidscan.data import read_split

    site = make_folder_dataset(tmp_path / "site", classes=("covid", "normal"), per_class=6, size=40, groups_per_class=2)
    other = make_folder_dataset(tmp_path / "other", classes=("covid", "normal"), per_class=6, size=40, manifest=False, seed=4)
    out = tmp_path / "lopo"
    argv = ["loso", "--data", str(site), str(other), "--out", str(out), "--field", "patient_id",
            "--sources", "normal_p0", "covid_p1", "--bootstrap", "0", "--quiet",
            *[a for kv in ("data.task=ct", "train.epochs=1", "train.batch_size=4", "model.weights=none", "data.image_size=32",
                           "augment.enabled=false") for a in ("--set", kv)]]  # fmt: skip
    assert main(argv) == 0
    for k, patient in enumerate(["normal_p0", "covid_p1"]):
        split = read_split(out / f"fold{k:02d}" / "loso_split.csv")
        test = split.subset("test").records
        assert {r.attribute("patient_id") for r in test} == {patient} and len(test) == 3
        trained = {r.attribute("patient_id") for r in split.subset("train").records + split.subset("val").records}
        assert patient not in trained and {"covid_p0", "normal_p1"} & trained  # the hospital's other patients kept
        assert json.loads((out / f"fold{k:02d}" / "fold.json").read_text())["fold"]["field"] == "patient_id"
    res = json.loads((out / "loso.json").read_text())
    assert res["field"] == "patient_id" and res["pooled"]["n"] == 6
    assert "| left-out patient_id |" in (out / "loso.md").read_text()
    bad = [*argv[: argv.index("--sources")], "--sources", "normal_p9", "--out", str(tmp_path / "bad")]
    assert main(bad) != 0 and not (tmp_path / "bad").exists()  # a patient that is not there: nothing made or trained

    # --resume keeps these folds, but not for other held-out patients in the same folders (fold00 would be stale)
    import covidscan.experiments.loso as loso_mod

    trained = []
    real_train = loso_mod.train
    monkeypatch.setattr(loso_mod, "train", lambda *a, **k: trained.append(a[2].name) or real_train(*a, **k))
    assert main([*argv, "--resume"]) == 0 and trained == []
    i = argv.index("--sources")
    assert main([*argv[: i + 1], "covid_p1", "normal_p0", *argv[i + 3 :], "--resume"]) == 0
    assert trained == ["fold00", "fold01"]


def two_patient_run(site, run):
    """A held-out site of 6 COVID images and two non-COVID patients (``normal_p0`` scored above every COVID
    image, ``normal_p1`` below), as fold00 of a leave-source-out run; fold01 holds only COVID images."""
    site = make_folder_dataset(site, classes=("covid", "normal"), per_class=6, groups_per_class=2)
    records = load_dataset([site], task="xray").records

    def score(r):
        if r.label == "covid":
            return 0.5 + 0.01 * int(r.path.stem[-1])
        return 0.9 if r.attribute("patient_id") == "normal_p0" else 0.1

    for name, rows in (("fold00", records), ("fold01", [r for r in records if r.label == "covid"])):
        d = run / name
        d.mkdir(parents=True)
        with open(d / "predictions.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["file", "label", "group", "p_covid"])
            w.writerows([str(r.path), r.label, r.group, score(r)] for r in rows)
    return site


def test_report_by_patient_ranks_each_non_covid_patient_against_the_covid_images(tmp_path):
    """``loso-report --by patient_id``: a held-out source whose non-COVID side is two patients, one scored above the
    COVID images (a pneumonia the model takes for COVID) and one below (a normal), has a fold AUROC that mixes a
    perfect and a reversed ranking; the report separates them."""
    from covidscan.experiments.pooling import pool, report_markdown

    site = two_patient_run(tmp_path / "site", tmp_path / "run")
    r = pool([tmp_path / "run"], by="patient_id", data=[site], n_boot=0)
    assert r["folds"][0]["auroc"] == pytest.approx(0.5)  # the two patients cancel out in the fold's figure
    assert r["folds"][0]["by_auroc"] == {"normal_p0": 0.0, "normal_p1": 1.0}
    assert "by_auroc" not in r["folds"][1]  # a fold with COVID images alone ranks nothing
    (row,) = [t for t in r["fixed_threshold"] if t["fold"] == "fold00"]
    assert row["by"] == {"normal_p0": 0.0, "normal_p1": 1.0}  # specificity at the other fold's 95%-sensitivity threshold
    text = report_markdown(r)
    assert "| fold00 | normal_p0 0.000; normal_p1 1.000 |" in text and "| fold00 | normal | 6 |" in text

    # a run of one fold (`covidscan loso --sources` one hospital): no threshold to transfer, the ranking still shows
    (tmp_path / "run" / "fold01" / "predictions.csv").unlink()
    one = pool([tmp_path / "run"], by="patient_id", data=[site], n_boot=0)
    assert one["fixed_threshold"] == [] and "| fold00 | normal_p0 0.000; normal_p1 1.000 |" in report_markdown(one)


def test_ledger_report_splits_by_the_yardsticks_field(tmp_path, capsys):
    """A yardstick with ``by: patient_id`` (the CT ones): ``covidscan ledger report`` of a variant, and of an
    ensemble of its runs, ranks each held-out non-COVID patient against the COVID images without being asked."""
    from covidscan.cli import main

    two_patient_run(tmp_path / "root" / "site", tmp_path / "exp" / "v")
    ledger = tmp_path / "ledger.yaml"
    ledger.write_text(
        "yardsticks: {y: {data: [site], sources: [], by: patient_id}, plain: {data: [site], sources: []}}\n"
        "variants: {v: {config: configs/ct_generalise_finetune.yaml, yardstick: y},"
        " w: {config: configs/ct_generalise_finetune.yaml, yardstick: plain}}\n"
        "ensembles: {both: [v, v]}\n"
    )
    opts = ["--ledger", str(ledger), "--data-root", str(tmp_path / "root"), "--out", str(tmp_path / "exp"), "--bootstrap", "0"]
    line = "| fold00 | normal_p0 0.000; normal_p1 1.000 |"
    for name in ("v", "both"):
        assert main(["ledger", "report", name, *opts]) == 0
        assert line in capsys.readouterr().out
    (tmp_path / "exp" / "w").symlink_to(tmp_path / "exp" / "v")
    assert main(["ledger", "report", "w", *opts]) == 0  # a yardstick without `by`: no split
    out = capsys.readouterr().out
    assert "normal_p0" not in out and "| fold00 | 12 | 6 |" in out


def test_site_adaptation_report_pools_bn_adapted_scores_of_every_member(tmp_path, monkeypatch):
    """``loso-report --site-adaptation``: each fold's model re-estimates BatchNorm on its held-out images (the
    same as ``covidscan adapt`` on that source's folder), the scores are cached per fold and pooled like the
    plain ones (an ensemble: every member adapted, then averaged), and a calibration part without a COVID image
    gives no site threshold instead of ending the report."""
    from PIL import Image

    from covidscan.cli import main
    from covidscan.experiments.loso import leave_one_source_out
    from covidscan.experiments.pooling import adapted_file, pool, read_scores
    from covidscan.inference import Predictor
    from covidscan.metrics import compute_metrics

    hosp = [make_folder_dataset(tmp_path / f"hosp{c}", classes=("covid", "normal"), per_class=8, size=40, manifest=False, seed=k)
            for k, c in enumerate("ABC", 1)]  # fmt: skip
    for p in (hosp[2]).rglob("*.png"):  # hospital C: a brighter, flatter look, so its BatchNorm statistics differ
        Image.fromarray((np.asarray(Image.open(p), dtype=np.float32) * 0.5 + 110).astype(np.uint8)).save(p)
    for p in sorted((hosp[2] / "covid").glob("*.png"))[1:]:  # and one COVID image: too few for a calibration part
        p.unlink()
    runs = []
    for seed in (0, 1):
        cfg = tiny_config(data={"task": "ct"}, train={"epochs": 1, "seed": seed})
        leave_one_source_out(cfg, hosp, tmp_path / f"run{seed}", n_boot=0)
        runs.append(tmp_path / f"run{seed}")
    md = tmp_path / "site.md"
    assert main(["loso-report", *map(str, runs), "--site-adaptation", "--bootstrap", "0", "--out", str(md)]) == 0
    text = md.read_text()

    fold_c = runs[0] / "fold02"  # held out hospital C
    plain, adapted = read_scores(fold_c / "predictions.csv"), read_scores(fold_c / adapted_file())
    assert set(adapted) == set(plain) and len(adapted) == 9
    assert all(adapted[f]["label"] == plain[f]["label"] for f in plain)
    # the cache is what a site gets from `covidscan adapt` on hospital C's scans with that fold's model
    assert main(["adapt", "--checkpoint", str(fold_c / "best.pt"), str(hosp[2]), "--out", str(tmp_path / "c.pt")]) == 0
    site_model = Predictor.from_checkpoint(tmp_path / "c.pt", device="cpu")
    for f in sorted(plain)[:4]:
        assert site_model.predict(f).probabilities["covid"] == pytest.approx(float(adapted[f]["p_covid"]), abs=1e-4)
    assert max(abs(float(adapted[f]["p_covid"]) - float(plain[f]["p_covid"])) for f in plain) > 1e-3  # it moved

    # pooled over both members' adapted scores, averaged per image
    folds = sorted(p.parent.name for p in runs[0].glob("fold*/best.pt"))
    y, p = [], []
    for name in folds:
        members = [read_scores(r / name / adapted_file()) for r in runs]
        for f in sorted(members[0]):
            y.append(members[0][f]["label"] == "covid")
            p.append(np.mean([float(m[f]["p_covid"]) for m in members]))
    auc = compute_metrics(np.asarray(y, int), np.stack([1 - np.asarray(p), np.asarray(p)], 1))["per_class"]["auroc"][1]
    r = pool(runs, n_boot=0, predictions=adapted_file())
    assert r["pooled"]["auroc"] == pytest.approx(auc) and f"| **pooled** | **{auc:.3f}" in text.split("BatchNorm-adapted")[1]
    # hospital C's 20% calibration part holds no COVID image: no threshold there, a note instead of an error
    assert "| fold02 | 9 |" in text and "(t = nan)" in text and "no site threshold" in text

    import covidscan.adapt as adapt_mod  # read back, not scored again

    monkeypatch.setattr(adapt_mod, "adapt_batchnorm", lambda *a, **k: (_ for _ in ()).throw(AssertionError("scored again")))
    assert main(["loso-report", *map(str, runs), "--site-adaptation", "--bootstrap", "0"]) == 0

"""Packed datasets (covidscan.data.packed): pack once, stream from disk, same results as the files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from covidscan.checkpoint import load_checkpoint
from covidscan.data import grouped_split, load_dataset, read_split
from covidscan.data.dataset import ImageStore, ScanDataset, open_store, scan_loader
from covidscan.data.pack import pack
from covidscan.data.packed import PackedImages
from covidscan.data.transforms import Preprocess
from covidscan.errors import DataError
from covidscan.training import train
from covidscan.training.data import rank_share
from tests.conftest import make_folder_dataset, tiny_config

PRE = Preprocess(image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)


@pytest.fixture
def packed(tmp_path):
    data = make_folder_dataset(tmp_path / "d", per_class=7, size=40)
    result = pack(data, tmp_path / "p", PRE, shard_images=5)
    return data, result


def test_pack_keeps_records_groups_split_and_pixels(packed):
    data, result = packed
    assert result.images == 21 and not result.skipped
    assert len(list(result.out.glob("shard-*.u8"))) == 5  # 21 images, 5 per shard
    files, pk = load_dataset(data), load_dataset(result.out)
    assert pk.packed is not None and files.packed is None
    key = lambda r: (r.path.parent.name, r.path.name)  # noqa: E731
    assert [(key(r), r.label, r.group, r.source) for r in pk.records] == [
        (key(r), r.label, r.group, r.source) for r in files.records
    ]
    a, b = grouped_split(files, test=0.3, val=0.2, seed=3), grouped_split(pk, test=0.3, val=0.2, seed=3)
    assert a.assignment == b.assignment
    direct = ImageStore(files.records, PRE).images
    streamed = open_store(pk.records, PRE, packed=pk.packed).images
    assert torch.equal(streamed[list(range(21))], direct)
    assert torch.equal(streamed[torch.tensor([20, 3])], direct[[20, 3]])


def test_training_on_a_pack_equals_training_on_the_files(tmp_path):
    data = make_folder_dataset(tmp_path / "d", per_class=8, size=40)
    cfg = tiny_config(train={"epochs": 2}, augment={"enabled": True})
    pre = Preprocess(image_size=cfg.data.image_size, mean=(0.0,) * 3, std=(1.0,) * 3)
    pack(data, tmp_path / "p", pre)
    a = train(cfg, data, tmp_path / "files")
    b = train(cfg, tmp_path / "p", tmp_path / "packed")
    sa, sb = load_checkpoint(a.last_checkpoint)["state_dict"], load_checkpoint(b.last_checkpoint)["state_dict"]
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    # the run's split names the pack's rows: resuming or evaluating reads the pack again
    split = read_split(tmp_path / "packed" / "split.csv")
    assert split.index.packed is not None and len(split.index) == 24


def test_a_moved_pack_still_trains_resumes_and_a_split_that_disagrees_is_refused(tmp_path):
    data = make_folder_dataset(tmp_path / "d", per_class=8, size=40)
    cfg = tiny_config(train={"epochs": 2})
    pack(data, tmp_path / "w" / "p", Preprocess(image_size=64, mean=(0.0,) * 3, std=(1.0,) * 3))
    train(cfg, tmp_path / "w" / "p", tmp_path / "w" / "run", stop_after_epoch=1)
    shutil.move(tmp_path / "w", tmp_path / "elsewhere")  # pack and run moved together, as to another machine
    resumed = train(None, None, tmp_path / "elsewhere" / "run", resume=True)
    assert len(resumed.history) == 2
    split_csv = tmp_path / "elsewhere" / "run" / "split.csv"
    text = split_csv.read_text().splitlines()
    i = next(k for k, line in enumerate(text) if ",covid," in line)
    text[i] = text[i].replace(",covid,", ",normal,", 1)  # a wrong label for that row of the pack
    split_csv.write_text("\n".join(text) + "\n")
    with pytest.raises(ValueError, match="holds another image or label"):
        read_split(split_csv)


def test_bad_packs_are_clear_errors(packed, tmp_path):
    data, result = packed
    with pytest.raises(DataError, match="exists"):
        pack(data, result.out, PRE)
    with pytest.raises(DataError, match="needs '48_"):
        open_store(load_dataset(result.out).records, Preprocess(image_size=48, mean=(0.5,) * 3, std=(0.25,) * 3),
                   packed=load_dataset(result.out).packed)  # fmt: skip
    # a shard from a pack with another preprocessing setting (same size, so same byte count)
    other = pack(
        data, tmp_path / "eq", Preprocess(image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3, equalize=True), shard_images=5
    )
    moved = tmp_path / "mixed"
    shutil.copytree(result.out, moved)
    shutil.copy(other.out / "shard-00001.u8", moved / "shard-00001.u8")
    with pytest.raises(DataError, match="another pack or preprocessing"):
        PackedImages(moved)
    # a truncated shard
    shard = result.out / "shard-00002.u8"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated"):
        load_dataset(result.out)
    # a pack cannot be merged with files (the labels would no longer be tied to rows)
    shutil.rmtree(result.out)
    pack(data, result.out, PRE)
    with pytest.raises(ValueError, match="cannot be merged"):
        load_dataset([result.out, data])


def test_unreadable_images_are_listed_and_an_interrupted_pack_leaves_nothing(tmp_path, monkeypatch):
    data = make_folder_dataset(tmp_path / "d", per_class=4, size=40, manifest=False)
    (data / "covid" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    result = pack(data, tmp_path / "p", PRE)
    assert result.images == 12 and len(result.skipped) == 1 and "broken.png" in result.skipped[0][0]
    assert "broken.png" in (result.out / "skipped.csv").read_text()
    assert json.loads((result.out / "packed.json").read_text())["skipped"] == 1

    import covidscan.data.pack as packed_mod

    calls = {"n": 0}
    real = packed_mod._decode

    def dies(rec, pre):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(rec, pre)

    monkeypatch.setattr(packed_mod, "_decode", dies)
    with pytest.raises(KeyboardInterrupt):
        pack(data, tmp_path / "q", PRE, workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "p"]  # no q, no temporary folder
    # a pack killed outright (no clean-up ran) leaves its temporary folder: the next pack removes it
    stale = tmp_path / ".q.deadbeef.tmp"
    (stale / "sub").mkdir(parents=True)
    (stale / "shard-00000.u8").write_bytes(b"\0" * 1000)
    monkeypatch.setattr(packed_mod, "_decode", real)
    pack(data, tmp_path / "q", PRE)
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["d", "p", "q"]


def test_damaged_pack_rows_are_an_error_not_training_data(tmp_path, capsys):
    from covidscan.cli import main
    from covidscan.data.packed import HEADER, read_packed
    from covidscan.errors import DataError

    data = make_folder_dataset(tmp_path / "d", per_class=3, size=40)
    out = pack(data, tmp_path / "p", PRE).out
    assert main(["pack", "--verify", str(out)]) == 0 and "every row matches" in capsys.readouterr().out
    shard = out / "shard-00000.u8"
    raw = bytearray(shard.read_bytes())
    raw[HEADER + 5 * PRE.image_size**2 + 17] ^= 0xFF  # one flipped byte inside row 5
    shard.write_bytes(bytes(raw))
    _, images = read_packed(out)
    images[4]  # its neighbours read fine
    with pytest.raises(DataError, match="row 5 .*checksum"):
        images[5]
    assert main(["pack", "--verify", str(out)]) == 1 and "1 damaged (rows [5])" in capsys.readouterr().out
    assert main(["pack", str(data), "--out", str(tmp_path / "d" / "covid" / "covid_000.png")]) == 2  # --out a file
    assert "is a file" in capsys.readouterr().err


def test_processes_and_workers_read_every_packed_image_once(packed):
    _, result = packed
    index = load_dataset(result.out)
    store = open_store(index.records, PRE, packed=index.packed)
    ds = ScanDataset(store, list(range(len(index))), index.targets(), PRE)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(1)).tolist()
    seen = []
    for rank in range(2):
        for batch in scan_loader(ds, batch_size=4, sampler=rank_share(order, rank, 2), num_workers=2):
            seen += batch["index"].tolist()
            for img, i in zip(batch["image"], batch["index"]):  # each worker reads the right row
                assert torch.equal(img, store.images[int(i)])
    assert sorted(seen) == list(range(21))


def test_pack_command(tmp_path, capsys):
    from covidscan.cli import main

    data = make_folder_dataset(tmp_path / "d", per_class=4, size=40)
    assert main(["pack", str(data), "--out", str(tmp_path / "p"), "--size", "32", "--quiet"]) == 0
    assert "packed 12 images (32 px" in capsys.readouterr().out
    assert np.array_equal(PackedImages(tmp_path / "p").read(0).shape, (32, 32))
    assert main(["pack", str(data), "--out", str(tmp_path / "p"), "--size", "32", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists" in err[0]
    assert main(["stats", str(tmp_path / "p")]) == 0
    assert "40/40" in capsys.readouterr().out  # the files' own sizes, kept from packing


def test_evaluate_and_loso_read_a_pack(tmp_path, capsys):
    """evaluate --data PACKED (figures from the pack's pixels) and loso over a pack's sources."""
    from covidscan.cli import main

    data = make_folder_dataset(tmp_path / "d", per_class=8, size=40)
    assert main(["pack", str(data), "--out", str(tmp_path / "p"), "--size", "48", "--quiet"]) == 0
    sets = ["model.weights=none", "model.backbone=efficientnet_lite0", "data.image_size=48", "train.epochs=1"]
    common = [a for s in sets for a in ("--set", s)]
    assert main(["train", "--data", str(tmp_path / "p"), "--out", str(tmp_path / "run"), "--quiet", *common]) == 0
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--data", str(tmp_path / "p"),
                 "--out", str(out), "--grid", "4", "--bootstrap", "20"]) == 0  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert sum(c["images"] for c in metrics["counts"].values()) == 24
    assert (out / "grid.png").stat().st_size > 1000  # drawn from the pack's pixels (no image files)
    capsys.readouterr()
    assert main(["loso", "--data", str(tmp_path / "p"), "--out", str(tmp_path / "loso"), "--quiet", "--bootstrap", "0",
                 "--sources", "src_shared", *common, "--set", "data.allow_empty_class=true"]) == 0  # fmt: skip
    loso = json.loads((tmp_path / "loso" / "loso.json").read_text())
    assert [(f["source"], f["n"]) for f in loso["folds"]] == [("src_shared", 8)]  # the pack's pneumonia images


def test_probe_reads_a_pack_like_the_files(tmp_path):
    """The shortcut probe masks the pack's own pixels: the same three figures as on the image files."""
    from PIL import Image

    from covidscan.checkpoint import model_from_checkpoint
    from covidscan.probe import probe

    data = make_folder_dataset(tmp_path / "d", per_class=10, size=48)
    for ci, label in enumerate(("covid", "pneumonia", "normal")):  # a class-specific border: something to learn
        for f in (data / label).glob("*.png"):
            a = np.asarray(Image.open(f)).copy()
            a[:4, :] = a[-4:, :] = 60 + 80 * ci
            Image.fromarray(a).save(f)
    torch.manual_seed(0)
    ckpt = train(tiny_config(train={"epochs": 6}), data, tmp_path / "run").best_checkpoint
    _, meta = model_from_checkpoint(load_checkpoint(ckpt), ckpt)
    pack(data, tmp_path / "p", meta.preprocess)
    on_files, on_pack = probe(ckpt, data, device="cpu"), probe(ckpt, tmp_path / "p", device="cpu")
    assert on_pack["n"] == on_files["n"] == 30
    assert on_pack["results"] == on_files["results"]
    # masking changed what the model saw (else the three rows would be one measurement)
    assert len({tuple(r.values()) for r in on_pack["results"].values()}) > 1

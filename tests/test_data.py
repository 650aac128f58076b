import csv
import json
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from covidscan.cli import main
from covidscan.data import compute_stats, grouped_split, load_dataset, paper_split, read_split, write_split
from covidscan.data.manifest import DatasetIndex, Record
from tests.conftest import SHARED_DATA, make_folder_dataset


def test_folder_and_manifest_give_same_records(xray_dir):
    a = load_dataset(xray_dir)  # has manifest.csv -> read through it
    b = load_dataset(xray_dir / "manifest.csv")
    assert a.task == "xray" and len(a) == 18
    assert [(r.path, r.group) for r in a.records] == [(r.path, r.group) for r in b.records]
    assert a.grouping == "group_id"


def test_folder_without_manifest_is_image_level(tmp_path):
    root = make_folder_dataset(tmp_path / "d", manifest=False)
    index = load_dataset(root)
    assert index.grouping == "image" and index.counts() == {"covid": 6, "pneumonia": 6, "normal": 6}
    assert {r.source for r in index.records} == {"d"}


def test_ct_task_inferred(ct_dir):
    assert load_dataset(ct_dir).task == "ct"


def test_unknown_label_lists_allowed(tmp_path):
    root = make_folder_dataset(tmp_path / "d", manifest=False)
    (root / "tuberculosis").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "tuberculosis" / "a.png")
    with pytest.raises(ValueError, match="unknown label 'tuberculosis'.*covid"):
        load_dataset(root)


def test_unknown_label_in_manifest(xray_dir):
    rows = list(csv.DictReader(open(xray_dir / "manifest.csv")))
    rows[0]["label"] = "flu"
    with open(xray_dir / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(ValueError, match="unknown label 'flu'.*allowed labels: covid, pneumonia, normal"):
        load_dataset(xray_dir, "xray")


def test_empty_class_folder(tmp_path):
    root = make_folder_dataset(tmp_path / "d", manifest=False)
    (root / "pneumonia").joinpath("notes.txt").write_text("x")
    for p in (root / "pneumonia").glob("*.png"):
        p.unlink()
    with pytest.raises(ValueError, match="pneumonia.*holds no image files"):
        load_dataset(root)


def test_manifest_missing_file(xray_dir):
    (xray_dir / "covid" / "covid_000.png").unlink()
    with pytest.raises(FileNotFoundError, match="1 listed file.*covid_000.png"):
        load_dataset(xray_dir)


def test_a_moved_split_file_says_its_paths_are_relative(xray_dir, tmp_path):
    split = write_split(grouped_split(load_dataset(xray_dir), seed=0), tmp_path / "run" / "split.csv")
    assert len(read_split(split).index.records) == len(load_dataset(xray_dir).records)
    moved = tmp_path / "archive" / "2026" / "run"
    moved.parent.mkdir(parents=True)
    split.parent.rename(moved)
    with pytest.raises(FileNotFoundError, match="relative to .*archive/2026/run: was this folder moved"):
        read_split(moved / "split.csv")


def test_merge_rejects_disagreeing_tasks(xray_dir, ct_dir):
    with pytest.raises(ValueError, match="cannot merge|unknown label"):
        load_dataset([xray_dir, ct_dir], "ct")
    with pytest.raises(ValueError, match="cannot merge"):
        load_dataset([xray_dir, ct_dir])  # inferred: one is xray, the other ct
    merged = load_dataset([xray_dir, ct_dir], "xray")  # an X-ray set without pneumonia is fine when told
    assert merged.task == "xray" and len(merged) == 18 + 12
    assert {r.dataset for r in merged.records} == {"xray", "ct"}


def test_stats_hand_computed(tmp_path):
    root = tmp_path / "d"
    for label, sizes in {"covid": [(10, 20), (30, 40)], "normal": [(50, 60)]}.items():
        (root / label).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(np.zeros((h, w), np.uint8)).save(root / label / f"{i}.png")
    (root / "covid" / "bad.png").write_text("not an image")
    stats = compute_stats(load_dataset(root, "ct"))
    cov = stats.classes[0]
    assert cov.count == 2
    assert cov.width == {"min": 10, "max": 30, "mean": 20.0, "std": 10.0}
    assert cov.height == {"min": 20, "max": 40, "mean": 30.0, "std": 10.0}
    assert cov.formats == {"PNG": 2} and cov.modes == {"L": 2}
    assert stats.classes[1].width["mean"] == 50.0 and stats.classes[1].width["std"] == 0.0
    assert len(stats.skipped) == 1 and "bad.png" in stats.skipped[0][0]
    with pytest.raises(ValueError, match="bad.png"):
        compute_stats(load_dataset(root, "ct"), strict=True)


def test_stats_cli_json(xray_dir, capsys):
    assert main(["stats", str(xray_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [c["count"] for c in out["classes"]] == [6, 6, 6]


def test_cli_missing_path_one_line_error(capsys):
    assert main(["stats", "/no/such/folder"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such file or folder" in err[0]


def _synthetic_index(group_sizes, labels) -> DatasetIndex:
    records = []
    for g, (n, label) in enumerate(zip(group_sizes, labels)):
        for i in range(n):
            records.append(Record(path=__import__("pathlib").Path(f"/x/{g}_{i}.png"), label=label, group_id=f"g{g}"))
    return DatasetIndex("xray", records, [])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 6), st.sampled_from(["covid", "pneumonia", "normal"])), min_size=3, max_size=80),
    st.integers(0, 10_000),
)
def test_grouped_split_never_leaks(groups, seed):
    index = _synthetic_index([g[0] for g in groups], [g[1] for g in groups])
    split = grouped_split(index, test=0.2, val=0.1, seed=seed)
    where = {}
    for rec, s in zip(index.records, split.assignment):
        assert s in ("train", "val", "test")
        assert where.setdefault(rec.group, s) == s
    again = grouped_split(index, test=0.2, val=0.1, seed=seed)
    assert again.assignment == split.assignment


def test_grouped_split_proportions_hold_and_seed_matters():
    rng = np.random.default_rng(1)
    sizes = rng.integers(1, 4, 600).tolist()
    labels = rng.choice(["covid", "pneumonia", "normal"], 600, p=[0.4, 0.3, 0.3]).tolist()
    index = _synthetic_index(sizes, labels)
    split = grouped_split(index, seed=3)
    assert split.audit() == []
    n = len(index)
    assert abs(len(split.indices("test")) / n - 0.2) < 0.02
    assert abs(len(split.indices("val")) / n - 0.1) < 0.02
    assert grouped_split(index, seed=4).assignment != split.assignment


def test_paper_split_is_image_level(tmp_path):
    index = load_dataset(make_folder_dataset(tmp_path / "d", per_class=20))
    split = paper_split(index, seed=0)
    assert split.protocol == "paper-image-level"
    assert Counter(split.assignment)["test"] == round(0.2 * len(index))


def test_split_roundtrip_and_cli(xray_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # paths come from the CLI, not the working directory
    out = tmp_path / "elsewhere" / "split.csv"
    assert main(["split", str(xray_dir), "--out", str(out), "--seed", "5"]) == 0
    assert "train" in capsys.readouterr().out
    back = read_split(out)
    direct = grouped_split(load_dataset(xray_dir), seed=5)
    assert [r.path for r in back.index.records] == [r.path for r in direct.index.records]
    assert back.assignment == direct.assignment and back.protocol == "grouped"
    write_split(back, tmp_path / "again.csv")
    assert read_split(tmp_path / "again.csv").assignment == back.assignment


def test_split_via_folder_equals_via_manifest(xray_dir):
    a = grouped_split(load_dataset(xray_dir), seed=2)
    b = grouped_split(load_dataset(xray_dir / "manifest.csv"), seed=2)
    assert a.assignment == b.assignment


@pytest.mark.skipif(not (SHARED_DATA / "xray").is_dir(), reason="../shared/data is not beside this checkout")
def test_shared_data_counts():
    xray = load_dataset(SHARED_DATA / "xray")
    ct = load_dataset(SHARED_DATA / "ct")
    assert xray.counts() == {"covid": 427, "pneumonia": 326, "normal": 374}
    assert ct.counts() == {"covid": 1250, "normal": 1229}
    a = grouped_split(xray, seed=0)
    b = grouped_split(load_dataset(SHARED_DATA / "xray" / "manifest.csv"), seed=0)
    assert a.assignment == b.assignment and a.audit() == []

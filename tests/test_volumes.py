"""CT studies: reading DICOM series / NIfTI / zip into HU volumes, windowing, slice selection, aggregation,
and the real JPEG-Lossless series in ../shared/data/ct-volumes."""

import csv
import io
import json
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from covidscan.config import StudyConfig
from covidscan.data.volume import VolumeError, read_series_zip, read_volume
from covidscan.study import aggregate, find_studies, lung_box, lung_mask, select_slices, window

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct-volumes"


@pytest.fixture(scope="module")
def tiny_ct_checkpoint(tmp_path_factory):
    """A tiny CT slice model (1 epoch on synthetic slices): enough to run the study path end to end."""
    import torch

    from covidscan.training import train
    from tests.conftest import make_folder_dataset, tiny_config

    root = tmp_path_factory.mktemp("ctdata")
    data = make_folder_dataset(root / "ct", classes=("covid", "normal"), per_class=6, size=48)
    torch.manual_seed(0)
    cfg = tiny_config(data={"task": "ct"}, train={"epochs": 1})
    return train(cfg, data, tmp_path_factory.mktemp("ctrun") / "tiny").best_checkpoint


@pytest.fixture(scope="module")
def tiny_ct_predictor(tiny_ct_checkpoint):
    from covidscan.inference import Predictor

    return Predictor.from_checkpoint(tiny_ct_checkpoint, device="cpu")


def phantom(n=6, size=48, seed=0) -> np.ndarray:
    """``n x size x size`` HU: air outside, a soft-tissue body with two lungs (-850 HU) inside."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    vol = np.full((n, size, size), -1000.0)
    body = ((yy - size / 2) / (size * 0.42)) ** 2 + ((xx - size / 2) / (size * 0.46)) ** 2 <= 1
    for z in range(n):
        s = vol[z]
        s[body] = 40 + rng.normal(0, 5, body.sum())
        for cx in (size * 0.32, size * 0.68):
            lung = ((yy - size / 2) / (size * 0.28)) ** 2 + ((xx - cx) / (size * 0.12)) ** 2 <= 1
            s[lung] = -850
    return np.round(vol)


def write_series(
    folder: Path,
    hu: np.ndarray,
    *,
    z0=-100.0,
    step=2.5,
    positions=None,
    series_uid=None,
    slope=1.0,
    intercept=-1024.0,
    names=None,
    shuffle=True,
):
    """Write ``hu`` as one DICOM file per slice (uint16 stored values, rescale to HU), in a shuffled order."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    order = list(range(len(hu)))
    if shuffle:
        random.Random(1).shuffle(order)
    for k in order:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.SeriesInstanceUID, ds.StudyInstanceUID = "CT", "anon-1", series_uid, "1.2.3"
        ds.Rows, ds.Columns = hu.shape[1:]
        ds.PixelSpacing = [0.7, 0.7]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        z = positions[k] if positions is not None else z0 + step * k
        ds.ImagePositionPatient = [-170.0, -170.0, float(z)]
        ds.InstanceNumber = len(hu) - k  # deliberately not in position order
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = np.round((hu[k] - intercept) / slope).astype(np.uint16).tobytes()
        name = names[k] if names else f"IMG{random.Random(k).randint(0, 10**6):07d}.dcm"
        ds.save_as(folder / name, enforce_file_format=True)
    return series_uid


def test_shuffled_series_comes_back_sorted_with_spacing_and_exact_hu(tmp_path):
    hu = phantom(6)
    hu[:, 0, 0] = np.arange(6) * 100 - 1000  # a per-slice marker: slice k holds -1000 + 100 k
    write_series(tmp_path / "s", hu, step=2.5)
    vol = read_volume(tmp_path / "s")
    assert vol.hu.shape == hu.shape
    np.testing.assert_array_equal(vol.hu, hu)  # sorted feet -> head, rescale slope / intercept exact
    assert vol.spacing == pytest.approx((2.5, 0.7, 0.7))
    assert vol.gaps == [] and vol.meta["sorted_by"] == "ImagePositionPatient" and vol.meta["Modality"] == "CT"


def test_rescale_slope_and_intercept_applied(tmp_path):
    hu = 2 * np.round(phantom(3) / 2)  # representable with slope 2
    write_series(tmp_path / "s", hu, slope=2.0, intercept=-2048.0)
    np.testing.assert_array_equal(read_volume(tmp_path / "s").hu, hu)


def test_gap_is_reported(tmp_path, caplog):
    write_series(tmp_path / "s", phantom(5), positions=[0.0, 2.0, 4.0, 10.0, 12.0])
    vol = read_volume(tmp_path / "s")
    assert vol.gaps == [(2, pytest.approx(6.0))]
    assert vol.spacing[0] == pytest.approx(2.0)


def test_bad_series_give_one_line_errors(tmp_path):
    write_series(tmp_path / "mixed", phantom(3), series_uid="1.2.3.4")
    write_series(tmp_path / "mixed", phantom(3), series_uid="1.2.3.5", z0=50.0, names=["b0.dcm", "b1.dcm", "b2.dcm"])
    with pytest.raises(VolumeError, match="2 series mixed"):
        read_volume(tmp_path / "mixed")
    write_series(tmp_path / "one", phantom(1))
    with pytest.raises(VolumeError, match="single slice"):
        read_volume(tmp_path / "one")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.dcm").write_text("not dicom")
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    with pytest.raises(VolumeError, match="no DICOM images"):
        read_volume(tmp_path / "junk")
    with pytest.raises(VolumeError, match="no such file"):
        read_volume(tmp_path / "missing")
    for exc in (VolumeError,):
        try:
            read_volume(tmp_path / "junk")
        except exc as e:
            assert "\n" not in str(e)


def test_non_dicom_files_in_a_series_folder_are_skipped(tmp_path):
    write_series(tmp_path / "s", phantom(4))
    (tmp_path / "s" / "README.txt").write_text("scanner export")
    assert read_volume(tmp_path / "s").n_slices == 4


def test_missing_decoder_names_the_package(tmp_path, monkeypatch):
    """A compressed transfer syntax whose decoder is missing: the error says what to install."""
    write_series(tmp_path / "s", phantom(2))
    import pydicom

    from covidscan.data import volume as volume_mod

    real = pydicom.dcmread

    def fake_read(src, *a, **k):
        ds = real(src, *a, **k)
        ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGLosslessSV1  # claims JPEG Lossless, holds raw bytes

        class Broken(type(ds)):
            @property
            def pixel_array(self):
                raise RuntimeError("Unable to decompress 'JPEG Lossless' pixel data because all plugins are missing")

        ds.__class__ = Broken
        return ds

    monkeypatch.setattr(pydicom, "dcmread", fake_read)
    with pytest.raises(VolumeError, match="python-gdcm"):
        volume_mod.read_volume(tmp_path / "s")


def test_nifti_round_trip(tmp_path):
    nib = pytest.importorskip("nibabel")
    hu = phantom(5, size=40).astype(np.float32)
    hu[:, 2, 5] = 500  # an anterior, right-sided marker (row 2, column 5)
    # radiological display (row 0 anterior, column 0 patient's right) -> RAS+ voxel array [x, y, z]
    data = np.transpose(hu[:, ::-1, ::-1], (2, 1, 0))
    img = nib.Nifti1Image(data.astype(np.int16), np.diag([0.8, 0.8, 3.0, 1.0]))
    nib.save(img, tmp_path / "ct.nii.gz")
    vol = read_volume(tmp_path / "ct.nii.gz")
    np.testing.assert_array_equal(vol.hu, hu)
    assert vol.spacing == pytest.approx((3.0, 0.8, 0.8))
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.int16), np.eye(4)), tmp_path / "flat.nii")
    with pytest.raises(VolumeError, match="3-D volume expected"):
        read_volume(tmp_path / "flat.nii")


def test_zip_series_and_zip_bomb(tmp_path):
    hu = phantom(4)
    write_series(tmp_path / "s", hu)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted((tmp_path / "s").iterdir()):
            zf.write(f, f"study/{f.name}")
    np.testing.assert_array_equal(read_series_zip(buf.getvalue()).hu, hu)
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.dcm", b"\0" * 5_000_000)  # 5 MB of zeros deflate to a few KB
    assert len(bomb.getvalue()) < 50_000
    with pytest.raises(VolumeError, match="over the 1 MB limit"):
        read_series_zip(bomb.getvalue(), max_bytes=1_000_000)


def test_window_maps_known_hu_to_known_grey():
    hu = np.array([-2000, -1350, -600, 150, 3000], dtype=np.float32)
    np.testing.assert_array_equal(window(hu, -600, 1500), [0, 0, 128, 255, 255])  # -600 -> 127.5 -> 128
    np.testing.assert_array_equal(window(np.array([-1000.0, 0.0]), -500, 1000), [0, 255])


def test_lung_mask_selection_and_box():
    hu = phantom(1, size=64)[0]
    m = lung_mask(hu)
    assert 0.08 < m.mean() < 0.3  # two lungs, not the outside air
    assert not m[0].any() and not m[:, 0].any()
    t, b, lft, r = lung_box(m, margin=0.0)
    assert (t, b) == tuple(np.flatnonzero(m.any(1))[[0, -1]] + [0, 1])
    keep = select_slices(np.array([0.0, 0.005, 0.05, 0.2, 0.21, 0.1]), 0.25)
    assert keep.tolist() == [False, False, False, True, True, True]


def test_aggregation_rules_on_given_scores():
    p = [0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert aggregate(p, "topk", 0.25) == pytest.approx(0.8)  # top 3 of 12: (0.9 + 0.8 + 0.7) / 3
    assert aggregate(p, "topk", 0.5) == pytest.approx((0.9 + 0.8 + 0.7 + 0.3 + 0.2 + 0.1) / 6)
    assert aggregate(p, "mean") == pytest.approx(sum(p) / 12)
    assert aggregate(p, "max") == 0.9
    assert aggregate([0.5, 0.5], "noisy_or") == pytest.approx(0.75)
    assert aggregate([0.2, 0.9], "topk", 0.1) == pytest.approx(0.55)  # fewer than 3 slices: all of them
    with pytest.raises(ValueError):
        aggregate(p, "median")


def test_study_on_a_phantom_with_a_tiny_model(tmp_path, tiny_ct_predictor):
    from covidscan.study import predict_study
    from covidscan.study_files import write_study

    hu = phantom(8, size=64)
    hu[0] = -1000  # a slice outside the body: not scored
    write_series(tmp_path / "s", hu)
    res = predict_study(tiny_ct_predictor, tmp_path / "s")
    scored = [s["probability"] for s in res.scored]
    assert len(res.slices) == 8 and len(scored) == 7 and res.slices[0]["scored"] is False
    assert res.probability == pytest.approx(aggregate(scored, "topk", StudyConfig().top))
    assert res.label in tiny_ct_predictor.class_names
    out = write_study(res, tmp_path / "out", predictor=tiny_ct_predictor, volume=read_volume(tmp_path / "s"))
    assert (out / "slices.csv").read_text().count("\n") == 9
    assert (out / "slices.png").stat().st_size > 1000 and (out / "montage.png").stat().st_size > 1000


def test_find_studies_splits_series_from_images(tmp_path):
    write_series(tmp_path / "root" / "a" / "s1", phantom(2))
    write_series(tmp_path / "root" / "b", phantom(2))
    (tmp_path / "root" / "x.nii.gz").write_bytes(b"")
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "root" / "slice.png")
    studies, images = find_studies([tmp_path / "root"])
    assert sorted(p.name for p in studies) == ["b", "s1", "x.nii.gz"]
    assert [p.name for p in images] == ["slice.png"]


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/ct-volumes not present")
def test_real_jpeg_lossless_series_decode():
    vol = read_volume(SHARED / "covid" / "P001")
    assert vol.n_slices == 74 and vol.hu.shape[1:] == (512, 512)
    assert vol.meta["transfer_syntax"] == "1.2.840.10008.1.2.4.70"  # JPEG Lossless, decoded by python-gdcm
    assert vol.spacing[0] == pytest.approx(4.0, abs=0.01) and vol.gaps == []
    assert vol.hu.min() == -1024 and 1000 < vol.hu.max() < 4000
    lung = np.mean([lung_mask(s).mean() for s in vol.hu[30:40]])
    assert lung > 0.05  # mid-chest slices hold lung: HU are HU
    # head-first order in slice_labels.csv is descending SliceLocation: ours runs feet -> head (ascending)
    assert np.all(np.diff(vol.positions) > 0)


def test_service_scores_a_zipped_study(tmp_path, tiny_ct_predictor):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from covidscan.serve.app import create_app

    write_series(tmp_path / "s", phantom(5, size=64))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted((tmp_path / "s").iterdir()):
            zf.write(f, f.name)
    client = TestClient(create_app(tiny_ct_predictor, max_study_bytes=2_000_000))
    r = client.post("/predict_study", files={"file": ("study.zip", buf.getvalue(), "application/zip")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["n_slices"] == 5 and len(body["slices"]) == 5 and body["label"] in ("covid", "normal")
    scored = [s["probability"] for s in body["slices"] if s["scored"]]
    assert body["probability"] == pytest.approx(aggregate(scored, "topk", 0.25))
    assert len(body["plot_png_base64"]) > 1000 and body["slice_views"] is None
    r = client.post("/predict_study?slices=true", files={"file": ("study.zip", buf.getvalue(), "application/zip")})
    views = r.json()["slice_views"]
    assert [v["index"] for v in views] == [s["index"] for s in body["slices"] if s["scored"]]
    assert [v["probability"] for v in views] == pytest.approx(scored)
    assert all(len(v["png_base64"]) > 100 and len(v["map_png_base64"]) > 100 for v in views)
    r = client.post("/predict_study?slices=true&heatmaps=false", files={"file": ("study.zip", buf.getvalue(), "application/zip")})
    assert all(v["map_png_base64"] is None for v in r.json()["slice_views"])
    r = client.post("/predict_study", files={"file": ("notes.txt", b"hello", "text/plain")})
    assert r.status_code == 415 and "not a CT study upload" in r.json()["detail"]
    big = b"PK\x03\x04" + b"\0" * 2_100_000
    r = client.post("/predict_study", files={"file": ("big.zip", big, "application/zip")})
    assert r.status_code == 413


def test_cli_stats_and_predict_on_studies(tmp_path, tiny_ct_checkpoint, capsys):
    from covidscan.cli import main

    write_series(tmp_path / "studies" / "good", phantom(6, size=64), step=3.0)
    write_series(tmp_path / "studies" / "mixed", phantom(3), series_uid="1.2.3.4")
    write_series(tmp_path / "studies" / "mixed", phantom(3), series_uid="1.2.3.5", z0=50.0, names=["b0.dcm", "b1.dcm", "b2.dcm"])
    assert main(["stats", str(tmp_path / "studies" / "good")]) == 0
    out = capsys.readouterr().out
    assert " 6  64x64  3.00  0.700" in out
    rc = main(["predict", "--checkpoint", str(tiny_ct_checkpoint), str(tmp_path / "studies"), "--study-out", str(tmp_path / "o")])
    captured = capsys.readouterr()
    assert rc == 1  # one study failed ...
    assert "2 series mixed" in captured.err and captured.err.count("error:") == 1
    lines = [ln for ln in captured.out.splitlines() if "p(covid)=" in ln]
    assert len(lines) == 1 and lines[0].startswith(str(tmp_path / "studies" / "good"))  # ... the other one is kept
    assert (tmp_path / "o" / "good" / "slices.csv").is_file() and (tmp_path / "o" / "good" / "montage.png").is_file()
    # the checkpoint's study settings can be overridden per call, validated
    import json

    good = str(tmp_path / "studies" / "good")
    assert main(["predict", "--checkpoint", str(tiny_ct_checkpoint), good, "--json", "--study", "rule=max"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["rule"] == "max"
    rows = list(csv.DictReader(open(tmp_path / "o" / "good" / "slices.csv")))
    assert row["probability"] == pytest.approx(max(float(r["probability"]) for r in rows if r["scored"] == "True"))
    assert main(["predict", "--checkpoint", str(tiny_ct_checkpoint), good, "--study", "rule=median"]) == 2
    assert "study.rule='median'; choose topk | mean | max | noisy_or" in capsys.readouterr().err


def test_studies_need_a_ct_model(tmp_path, trained_run, capsys):
    """A studies folder evaluated with an X-ray checkpoint: one line, exit 2, nothing written."""
    from covidscan.cli import main

    write_series(tmp_path / "studies" / "covid" / "p1", phantom(4, size=64))
    (tmp_path / "studies" / "manifest.csv").write_text("series,label,task_label\ncovid/p1,covid,covid\n")
    result, _ = trained_run
    rc = main(
        [
            "evaluate",
            "--checkpoint",
            str(result.best_checkpoint),
            "--data",
            str(tmp_path / "studies"),
            "--out",
            str(tmp_path / "ev"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "CT studies need a CT model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ev").exists()


def test_study_slices_become_a_grouped_slice_dataset(tmp_path, capsys):
    """Lung slices are exported windowed, labelled by study and slice labels, grouped by study; the
    result loads as a CT dataset whose images are the windowed HU."""
    from PIL import Image

    from covidscan.cli import main
    from covidscan.data import load_dataset
    from covidscan.study import window

    root = tmp_path / "studies"
    hu = phantom(5, size=48)
    hu[:, 20:24, 12:16] = -300  # an "opacity" inside the left lung
    hu[0, 12:36, 10:38] = 40  # slice 0: no lung (below the lungs)
    write_series(root / "covid" / "A", hu, names=[f"a{k}.dcm" for k in range(5)])
    write_series(root / "cap" / "B", phantom(4, size=48, seed=2), names=[f"b{k}.dcm" for k in range(4)])
    (root / "manifest.csv").write_text("series,label,task_label,patient_id\ncovid/A,covid,covid,A\ncap/B,cap,normal,B\n")
    # slices a1, a2 infected; a3, a4 clear (left out); B's slices are non-COVID
    rows = ["file,patient_id,label,infection"] + [f"covid/A/a{k}.dcm,A,covid,{int(k in (1, 2))}" for k in range(5)]
    (root / "slice_labels.csv").write_text("\n".join(rows) + "\n")
    assert main(["study-slices", str(root), "--out", str(tmp_path / "slices"), "--source", "site-x"]) == 0
    assert "2 covid, 4 normal; 2 clear slices of COVID studies left out" in capsys.readouterr().out
    index = load_dataset(tmp_path / "slices")
    assert index.task == "ct" and index.counts() == {"covid": 2, "normal": 4}
    assert {r.group for r in index.records if r.label == "covid"} == {"studies:A"}
    assert {r.source for r in index.records} == {"site-x"}
    first = next(r for r in index.records if r.label == "covid")
    k = int(first.row["slice"][1])  # a1 or a2: the slice's index in the (caudal-first) volume
    from covidscan.data.volume import read_volume

    vol = read_volume(root / "covid" / "A")
    expected = window(vol.hu[vol.names.index(first.row["slice"])], -600, 1500)
    assert k in (1, 2) and np.array_equal(np.asarray(Image.open(first.path)), expected)
    assert main(["study-slices", str(root), "--out", str(tmp_path / "slices")]) == 2  # not over a dataset


def test_a_ct_slice_scored_alone_gets_the_probability_it_gets_inside_its_study(tmp_path, tiny_ct_predictor):
    """One preprocessing path: a DICOM slice with Hounsfield units and a window of its own (a bone window
    here) is mapped with the model's lung window, as the study maps it, whatever window the file carries."""
    from pydicom import dcmread

    from covidscan.data.io import read_image
    from covidscan.study import predict_study

    write_series(tmp_path / "s", phantom(4, size=64), shuffle=False, names=[f"s{k}.dcm" for k in range(4)])
    for f in (tmp_path / "s").iterdir():  # a window of the file's own, far from the lung window
        ds = dcmread(f)
        ds.WindowCenter, ds.WindowWidth = 400, 1800
        ds.save_as(f)
    res = predict_study(tiny_ct_predictor, tmp_path / "s")
    for row in res.scored:
        alone = tiny_ct_predictor.predict(tmp_path / "s" / row["name"])
        assert alone.probabilities["covid"] == pytest.approx(row["probability"], abs=1e-6)
        assert not any(w.startswith("no lung") for w in alone.warnings)  # a chest slice: lung found
    scan = read_image(tmp_path / "s" / "s1.dcm")
    assert scan.hu is not None and scan.hu.min() == pytest.approx(-1000) and scan.hu.max() >= 30


def test_a_slice_or_study_without_lung_is_flagged_never_normal(tmp_path, tiny_ct_predictor, tiny_ct_checkpoint, capsys):
    from covidscan.cli import main
    from covidscan.study import UNDETERMINED, predict_study

    hu = phantom(3, size=64)
    hu[:, hu[0] > -950] = 45  # abdomen-like: the body (lungs included) filled with soft tissue
    write_series(tmp_path / "abdomen", hu, names=[f"a{k}.dcm" for k in range(3)])
    p = tiny_ct_predictor.predict(tmp_path / "abdomen" / "a0.dcm")
    assert p.out_of_distribution and any(w.startswith("no lung in this slice") for w in p.warnings)
    res = predict_study(tiny_ct_predictor, tmp_path / "abdomen")
    assert res.label == UNDETERMINED and res.probability != res.probability and "no slice with lung" in res.warnings[0]
    assert res.to_dict()["label"] == UNDETERMINED
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(tiny_ct_checkpoint), str(tmp_path / "abdomen"), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["label"] == UNDETERMINED and row["probability"] is None


def test_a_study_scored_high_everywhere_is_reported_with_its_spread_and_a_warning(tmp_path, tiny_ct_predictor, monkeypatch):
    from covidscan.study import predict_study

    write_series(tmp_path / "s", phantom(14, size=64))
    k = tiny_ct_predictor.class_names.index("covid")

    def scores(values):
        def probabilities(x):
            p = np.zeros((len(x), 2), np.float32)
            p[:, k] = values[: len(x)] if len(values) >= len(x) else values[0]
            p[:, 1 - k] = 1 - p[:, k]
            return p

        return probabilities

    monkeypatch.setattr(tiny_ct_predictor, "probabilities", scores([0.97]))
    res = predict_study(tiny_ct_predictor, tmp_path / "s", batch=64)
    assert res.label == "covid" and res.spread["share_high"] == 1.0 and res.spread["p10"] == pytest.approx(0.97)
    assert any("rarely reaches every slice" in w for w in res.warnings) and "p10 / median / p90" in res.line()
    half = np.asarray([0.9] * 7 + [0.1] * 7, np.float32)
    monkeypatch.setattr(tiny_ct_predictor, "probabilities", scores(half))
    res = predict_study(tiny_ct_predictor, tmp_path / "s", batch=64)
    assert res.spread["share_high"] == pytest.approx(0.5) and not any("every slice" in w for w in res.warnings)


def test_calibrate_on_studies_sets_a_study_level_threshold(tmp_path, tiny_ct_checkpoint, capsys):
    """A CT model calibrated on a studies folder: the threshold is set on patients' study scores and decides
    studies, not single slices."""
    from covidscan.checkpoint import load_checkpoint
    from covidscan.cli import main
    from covidscan.inference import Predictor
    from covidscan.study import predict_study

    root = tmp_path / "studies"
    rows = ["series,label,task_label,patient_id"]
    for k in range(4):
        label = "covid" if k % 2 == 0 else "normal"
        write_series(root / label / f"P{k}", phantom(4, size=48, seed=k), names=[f"s{k}_{j}.dcm" for j in range(4)])
        rows.append(f"{label}/P{k},{label},{label},P{k}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "cal.pt"
    assert main(["calibrate", "--checkpoint", str(tiny_ct_checkpoint), "--data", str(root), "--sensitivity", "1.0",
                 "--out", str(out), "--bootstrap", "20"]) == 0  # fmt: skip
    t = load_checkpoint(out)["meta"].threshold
    assert t["level"] == "study" and t["positives"] == 2 and t["negatives"] == 2
    assert any("only 2 positives" in w for w in t["warnings"])
    p = Predictor.from_checkpoint(out, device="cpu")
    res = predict_study(p, root / "covid" / "P0")
    assert res.label == ("covid" if res.probability >= t["value"] else "normal")  # the study threshold decides
    assert p.predict(root / "covid" / "P0" / "s0_0.dcm").decision is None  # not single slices
    assert "study" in capsys.readouterr().out


def test_adapt_on_a_series_takes_statistics_from_the_lung_slices_the_study_scores(tmp_path, tiny_ct_checkpoint):
    """``covidscan adapt`` given a CT series (or a studies folder) re-estimates BatchNorm on the slices the study
    scorer reads (lung slices, lung window): the same statistics as adapting on those slices' files alone, not
    on every file of the folder (a slice below the lungs would move them)."""
    from covidscan.checkpoint import load_checkpoint
    from covidscan.cli import main

    hu = phantom(5, size=48)
    hu[0, 6:42, 6:42] = 40  # slice 0: no lung (below the lungs), never scored
    write_series(tmp_path / "s", hu, shuffle=False, names=[f"s{k}.dcm" for k in range(5)])

    def stats(*paths):
        out = tmp_path / f"a{len(list(tmp_path.glob('a*.pt')))}.pt"
        assert main(["adapt", "--checkpoint", str(tiny_ct_checkpoint), *map(str, paths), "--out", str(out)]) == 0
        ck = load_checkpoint(out)
        sd = ck["state_dict"]
        return ck["meta"].adaptation["images"], torch.cat([v.flatten() for k, v in sd.items() if k.endswith("running_mean")])

    n_series, series = stats(tmp_path / "s")
    n_lung, lung = stats(*[tmp_path / "s" / f"s{k}.dcm" for k in range(1, 5)])
    n_all, every = stats(*sorted((tmp_path / "s").glob("*.dcm")))
    assert n_series == n_lung == 4 and n_all == 5
    assert torch.allclose(series, lung, atol=1e-5)
    assert not torch.allclose(series, every, atol=1e-3)  # the non-lung slice would have counted
    root = tmp_path / "studies"  # a studies folder (manifest of series) reads the same way
    write_series(root / "normal" / "P0", hu, shuffle=False, names=[f"p{k}.dcm" for k in range(5)])
    (root / "manifest.csv").write_text("series,label,patient_id\nnormal/P0,normal,P0\n")
    n_root, from_root = stats(root)
    assert n_root == 4 and torch.allclose(from_root, series, atol=1e-5)


@pytest.mark.parametrize("kind", ["nifti", "dicom"])
def test_study_volumes_lie_on_the_input_geometry(tmp_path, tiny_ct_predictor, kind, monkeypatch):
    """--study-out's lung_window.nii.gz and heatmap.nii.gz: every input voxel's world position holds, in the output,
    that voxel's HU in the lung window (so both open over the scan in a viewer); scored slices carry a heat map."""
    import nibabel as nib

    from covidscan.study import predict_study, window
    from covidscan.study_files import write_study

    hu = phantom(6, size=40)
    hu[:, 5:9, 30:34] = 300  # an asymmetric mark: flips and transposes would move it
    if kind == "nifti":
        # stored as LPS-ish (x flipped) with an offset and anisotropic voxels: not canonical on purpose
        data = np.transpose(hu, (2, 1, 0)).astype(np.int16)  # x = column, y = row, z = slice
        affine = np.array([[-0.7, 0, 0, 90.0], [0, 0.8, 0, -40.0], [0, 0, 2.5, -200.0], [0, 0, 0, 1]])
        nib.save(nib.Nifti1Image(data, affine), tmp_path / "in.nii.gz")
        src = tmp_path / "in.nii.gz"
        world_of = lambda i, j, k: affine @ np.array([i, j, k, 1.0])  # noqa: E731
        hu_at = lambda i, j, k: data[i, j, k]  # noqa: E731
        shape = data.shape
    else:
        write_series(tmp_path / "s", hu, shuffle=True)
        src = tmp_path / "s"
        # write_series: columns along +x (0.7 mm), rows along +y (0.7 mm), slices at z0 + 2.5 k, origin (-170, -170) LPS
        world_of = lambda i, j, k: np.array([-(-170.0 + 0.7 * i), -(-170.0 + 0.7 * j), -100.0 + 2.5 * k, 1.0])  # noqa: E731
        hu_at = lambda i, j, k: hu[k, j, i]  # noqa: E731
        shape = (40, 40, 6)
    res = predict_study(tiny_ct_predictor, src)
    from covidscan.data.volume import read_volume

    out = write_study(res, tmp_path / "out", predictor=tiny_ct_predictor, volume=read_volume(src))
    lw, heat = nib.load(out / "lung_window.nii.gz"), nib.load(out / "heatmap.nii.gz")
    assert lw.shape == heat.shape and sorted(lw.shape) == sorted(shape)
    inv = np.linalg.inv(lw.affine)
    grey = np.asarray(lw.dataobj)
    rng = np.random.default_rng(0)
    for i, j, k in zip(rng.integers(0, shape[0], 40), rng.integers(0, shape[1], 40), rng.integers(0, shape[2], 40)):
        v = inv @ world_of(i, j, k)
        idx = tuple(int(round(x)) for x in v[:3])
        assert np.allclose(v[:3], idx, atol=1e-4)  # lands on a voxel centre
        assert grey[idx] == window(np.array([hu_at(i, j, k)], np.float32), -600, 1500)[0]
    # the heat map: each scored slice's map in that slice, 0 elsewhere (a stand-in map of 0.5 shows where it goes)
    monkeypatch.setattr(
        tiny_ct_predictor, "explain", lambda scan, cls=None, method="gradcam": (np.full(scan.pixels.shape, 0.5, np.float32), cls)
    )
    out = write_study(res, tmp_path / "out2", predictor=tiny_ct_predictor, volume=read_volume(src))
    h = np.asarray(nib.load(out / "heatmap.nii.gz").dataobj)
    scored = {r["index"] for r in res.scored}
    for k in range(6):  # slice k of the input: in the output at the voxels of world positions of slice k
        v = np.linalg.inv(nib.load(out / "heatmap.nii.gz").affine) @ world_of(3, 3, k)
        value = h[tuple(int(round(x)) for x in v[:3])]
        assert value == (0.5 if k in scored else 0.0), k

"""Memory budgets for every input path, and one bad file never costs the others (issue: Hardening II)."""

from __future__ import annotations

import io
import json
import tracemalloc
import zipfile

import numpy as np
import pytest
from PIL import Image

from covidscan.cli import main
from covidscan.data.io import read_bytes, read_image
from covidscan.errors import ImageReadError, VolumeError
from tests.conftest import chest_like, write_dicom


def dicom_dataset(rows: int, cols: int, pixel_bytes: bytes, *, frames: int | None = None, deflated: bool = False):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian if deflated else ExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "DX"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if frames:
        ds.NumberOfFrames = frames
    ds.PixelData = pixel_bytes
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_a_deflated_dicom_bomb_is_refused_while_inflating(monkeypatch):
    monkeypatch.setenv("COVIDSCAN_MAX_IMAGE_MB", "2")
    bomb = dicom_dataset(100, 100, b"\0" * (64 * 2**20), deflated=True)  # header 100 x 100, 64 MiB of pixel data
    assert len(bomb) < 200_000
    tracemalloc.start()
    with pytest.raises(ImageReadError, match="inflates beyond the 2 MiB image budget"):
        read_bytes(bomb, "bomb.dcm")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 8 * 2**20  # the budget and a little, never the 64 MiB
    ok = dicom_dataset(64, 64, (chest_like(64, 1) * 255).astype(np.uint8).tobytes(), deflated=True)
    scan = read_bytes(ok, "ok.dcm")  # a deflated file within the budget still reads
    assert scan.pixels.shape == (64, 64)


def test_pixel_data_that_disagrees_with_the_header_names_the_file_and_costs_no_other(trained_run, tmp_path, capsys):
    result, data = trained_run
    extra = dicom_dataset(48, 48, b"\x80" * (48 * 48 * 10))  # one frame declared, ten held
    (tmp_path / "x.dcm").write_bytes(extra)
    with pytest.raises(ImageReadError, match="header declares"):
        read_image(tmp_path / "x.dcm")
    good = sorted((data / "normal").glob("*.png"))[:2]
    rc = main(
        ["predict", "--checkpoint", str(result.best_checkpoint), str(good[0]), str(tmp_path / "x.dcm"), str(good[1]), "--json"]
    )
    out, err = capsys.readouterr()
    rows = json.loads(out)
    assert rc == 1 and [("error" in r) for r in rows] == [False, True, False]  # the good files keep their results
    assert "x.dcm" in rows[1]["source"] and "header declares" in rows[1]["error"]


def test_the_budget_counts_bytes_not_pixels(monkeypatch, tmp_path):
    monkeypatch.setenv("COVIDSCAN_MAX_IMAGE_MB", "1")
    Image.new("RGB", (400, 400), (10, 200, 30)).save(tmp_path / "colour.png")  # 400 x 400 x 3 x 4 = 1.8 MiB decoded
    Image.new("L", (400, 400), 90).save(tmp_path / "gray.png")  # 0.6 MiB: within
    with pytest.raises(ImageReadError, match="400 x 400 x 3 samples needs 2 MiB decoded, over the 1 MiB budget"):
        read_image(tmp_path / "colour.png")
    assert read_image(tmp_path / "gray.png").pixels.shape == (400, 400)
    write_dicom(tmp_path / "big.dcm", np.zeros((600, 600), np.uint16))  # 1.4 MiB decoded
    with pytest.raises(ImageReadError, match="over the 1 MiB budget"):
        read_image(tmp_path / "big.dcm")


def test_studies_have_a_total_budget(monkeypatch, tmp_path):
    import nibabel as nib

    from covidscan.data.volume import read_series_zip, read_volume
    from tests.test_volumes import phantom, write_series

    monkeypatch.setenv("COVIDSCAN_MAX_STUDY_MB", "1")
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 80), np.int16), np.eye(4)), tmp_path / "v.nii.gz")  # 1.25 MiB as float32
    with pytest.raises(VolumeError, match="study too large: 80 slices of 64 x 64"):
        read_volume(tmp_path / "v.nii.gz")
    write_series(tmp_path / "s", phantom(70, size=64))
    with pytest.raises(VolumeError, match="study too large: 70 slices"):
        read_volume(tmp_path / "s")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted((tmp_path / "s").iterdir()):
            zf.write(f, f.name)
    with pytest.raises(VolumeError, match="study too large"):
        read_series_zip(buf.getvalue(), "s.zip")
    monkeypatch.setenv("COVIDSCAN_MAX_STUDY_MB", "64")
    assert read_volume(tmp_path / "s").n_slices == 70  # within a larger budget


def test_service_concurrency_fits_the_memory_budget(monkeypatch):
    from covidscan.errors import CLIError
    from covidscan.serve.policy import pending_within_budget

    monkeypatch.setenv("COVIDSCAN_MAX_IMAGE_MB", "100")
    assert pending_within_budget(8, 3000, studies=False)[0] == 8  # 8 x 300 MiB fits 3,000 MiB
    n, why = pending_within_budget(8, 1000, studies=False)
    assert n == 3 and "lowered" in why  # 3 x 300 MiB
    with pytest.raises(CLIError, match="holds no prediction"):
        pending_within_budget(8, 100, studies=False)


def test_training_skips_a_bad_file_names_it_and_lists_it_in_the_run(tmp_path, caplog):
    from covidscan.training import train
    from tests.conftest import make_folder_dataset, tiny_config

    data = make_folder_dataset(tmp_path / "d", per_class=6, size=32, manifest=False)
    (data / "normal" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a picture")
    (data / "covid" / "zz_frames.dcm").write_bytes(dicom_dataset(32, 32, b"\x80" * (32 * 32 * 4)))
    r = train(tiny_config(train={"epochs": 1}), data, tmp_path / "run")
    listed = (r.out / "skipped.csv").read_text()
    assert "zz_broken.png" in listed and "zz_frames.dcm" in listed and "header declares" in listed
    assert any("zz_frames.dcm" in m for m in caplog.messages)

"""Shared fixtures: tiny synthetic scans written into temporary folders."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric="MONOCHROME2",
    slope=1.0,
    intercept=0.0,
    window: tuple[float, float] | None = None,
) -> Path:
    """Write an uncompressed single-frame DICOM with pydicom (stored values = ``pixels``, uint16)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def chest_like(size: int, seed: int, label_shift: float = 0.0) -> np.ndarray:
    """A grey image with two dark 'lungs'; ``label_shift`` brightens the lungs (a learnable class cue)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 0.7 + 0.05 * rng.standard_normal((size, size))
    for cx in (0.3, 0.7):
        lung = ((xx - cx) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1
        img[lung] = 0.25 + label_shift + 0.05 * rng.standard_normal(lung.sum())
    return np.clip(img, 0, 1)


def make_folder_dataset(
    root: Path,
    classes=("covid", "pneumonia", "normal"),
    per_class=6,
    size=40,
    groups_per_class=None,
    manifest=True,
    seed=0,
) -> Path:
    """ROOT/<label>/*.png, class-dependent content, plus a manifest with group ids."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for ci, label in enumerate(classes):
        (root / label).mkdir(exist_ok=True)
        for i in range(per_class):
            arr = chest_like(size, seed * 1000 + ci * 100 + i, label_shift=0.35 * ci)
            rel = f"{label}/{label}_{i:03d}.png"
            Image.fromarray((arr * 255).astype(np.uint8), mode="L").save(root / rel)
            g = i // 2 if groups_per_class is None else i % groups_per_class
            rows.append(
                {
                    "file": rel,
                    "label": label,
                    "group_id": f"{label}_g{g}",
                    "patient_id": f"{label}_p{g}",
                    "source": f"src_{label}" if ci % 2 == 0 else "src_shared",
                }
            )
    if manifest:
        with open(root / "manifest.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return root


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Caches go to a temporary folder, never to the user's home or beside ../shared."""
    monkeypatch.setenv("COVIDSCAN_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def xray_dir(tmp_path) -> Path:
    return make_folder_dataset(tmp_path / "xray")


@pytest.fixture
def ct_dir(tmp_path) -> Path:
    return make_folder_dataset(tmp_path / "ct", classes=("covid", "normal"))


def tiny_config(**sections):
    """A config for fast tests: tiny images, random weights, 2 epochs."""
    from covidscan.config import load_config, replace_cfg

    cfg = load_config(
        None,
        [
            "model.weights=none",
            "model.backbone=efficientnet_lite0",
            "data.image_size=64",
            "train.epochs=2",
            "train.batch_size=4",
            "train.lr=1e-3",
            "augment.enabled=false",
        ],
    )
    return replace_cfg(cfg, **sections) if sections else cfg


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One tiny checkpoint trained on synthetic X-rays, shared by the inference tests."""
    import torch

    from covidscan.training import train

    root = tmp_path_factory.mktemp("data")
    data = make_folder_dataset(root / "xray", per_class=10, size=48)
    torch.manual_seed(0)
    cfg = tiny_config(train={"epochs": 3})
    result = train(cfg, data, tmp_path_factory.mktemp("runs") / "tiny")
    return result, data

"""CT studies: a DICOM series folder, a NIfTI file or a zipped series -> a volume in Hounsfield units.

* **DICOM series folder**: every file in the folder (any name, any order; non-DICOM files such as
  ``DICOMDIR`` or notes are skipped with a warning) must belong to one series (``SeriesInstanceUID``);
  slices are sorted along the slice normal (``ImagePositionPatient`` projected on the cross product of
  the ``ImageOrientationPatient`` rows), else by ``SliceLocation``, else by ``InstanceNumber``. Pixel
  data are decoded by pydicom with the handlers installed: JPEG Lossless and JPEG-LS, JPEG 2000 and
  RLE through ``python-gdcm`` (a declared dependency), plain pixel data natively. The modality LUT
  (``RescaleSlope`` / ``RescaleIntercept``) gives Hounsfield units. Gaps (a step between neighbours over
  1.5 times the median step) are reported in :attr:`Volume.gaps`, not filled.
* **NIfTI** (``.nii`` / ``.nii.gz``, through nibabel): the data are taken as Hounsfield units (scaled by
  the header's ``scl_slope`` / ``scl_inter``), reoriented to RAS so that the last axis runs feet to head,
  and returned as slices along that axis.
* **zip** of a DICOM series (what the web service takes): members are read in memory; the
  uncompressed total is limited before anything is extracted (zip bombs).

Every failure is a :class:`VolumeError` (a :class:`~covidscan.errors.DataError`) with one line that names
the study and the cause.
"""

from __future__ import annotations

import io
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from covidscan.data.io import has_dicom_preamble
from covidscan.errors import DataError, VolumeError  # noqa: F401 (VolumeError: raised here, defined with the family)

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: largest uncompressed zip accepted by :func:`read_series_zip` (a 600-slice 512 x 512 16-bit series is ~320 MB)
MAX_ZIP_BYTES = 1_000_000_000
DECODER_HINT = "pip install python-gdcm (JPEG Lossless / JPEG-LS / JPEG 2000 / RLE decoders for pydicom)"


@dataclass
class Volume:
    """``hu``: ``Z x H x W`` float32 Hounsfield units, slice 0 the most caudal (feet) one.

    ``spacing``: (slice step, row spacing, column spacing) in mm; ``positions``: each slice's position
    along the slice normal (mm); ``names``: each slice's file (DICOM) or index (NIfTI); ``gaps``:
    ``(index_before, step_mm)`` for each step over 1.5x the median; ``meta``: patient and series facts.
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    positions: np.ndarray
    names: list[str]
    source: str
    gaps: list[tuple[int, float]] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    #: 4 x 4, voxel (column, row, slice) -> RAS millimetres (NIfTI's convention): the geometry of the input, so a
    #: volume written with it (covidscan.study.write_volumes) opens over the scan in 3D Slicer or ITK-SNAP
    affine: np.ndarray | None = None

    def to_nifti(self, array: np.ndarray):
        """A ``Z x H x W`` array of this volume's geometry as a NIfTI image (nibabel), axes (column, row, slice)."""
        import nibabel as nib

        affine = self.affine if self.affine is not None else np.diag([self.spacing[2], self.spacing[1], self.spacing[0], 1.0])
        return nib.Nifti1Image(np.ascontiguousarray(np.transpose(array, (2, 1, 0))), affine)

    @property
    def n_slices(self) -> int:
        return int(self.hu.shape[0])

    def summary(self) -> str:
        dz, dy, dx = self.spacing
        lo, hi = float(self.hu.min()), float(self.hu.max())
        gap = f", {len(self.gaps)} gap(s)" if self.gaps else ""
        return (
            f"{self.n_slices} slices of {self.hu.shape[1]}x{self.hu.shape[2]}, spacing {dz:.2f} x {dy:.2f} x {dx:.2f} mm, "
            f"HU {lo:.0f}..{hi:.0f}{gap}"
        )


def is_nifti(path: Path) -> bool:
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def _is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return has_dicom_preamble(fh.read(132))
    except OSError:
        return False


def is_series_folder(path: Path) -> bool:
    """A folder that directly holds at least one DICOM file (sniffed, not by name)."""
    path = Path(path)
    return path.is_dir() and any(p.is_file() and _is_dicom_file(p) for p in sorted(path.iterdir())[:64])


def is_volume_path(path: Path) -> bool:
    """True for a DICOM series folder, a NIfTI file or a ``.zip`` (read as a zipped series)."""
    path = Path(path)
    return is_series_folder(path) or (path.is_file() and (is_nifti(path) or path.suffix.lower() == ".zip"))


def is_studies_folder(path) -> bool:
    """A folder (or its ``manifest.csv``) whose manifest lists CT series (a ``series`` column), like ``ct-volumes``."""
    import csv

    p = Path(path)
    m = p if p.is_file() and p.name == "manifest.csv" else p / "manifest.csv"
    if not m.is_file():
        return False
    with open(m, newline="", encoding="utf-8-sig") as fh:
        return "series" in (csv.DictReader(fh).fieldnames or [])


def study_paths(path) -> list[Path]:
    """The studies under ``path``: the manifest's series for a studies folder, else series folders and
    NIfTI / zip files found by walking it (``path`` itself when it is one)."""
    import csv

    p = Path(path)
    if is_studies_folder(p):
        root = p.parent if p.is_file() else p
        with open(root / "manifest.csv", newline="", encoding="utf-8-sig") as fh:
            return [root / r["series"] for r in csv.DictReader(fh)]
    if is_series_folder(p) or (p.is_file() and (is_nifti(p) or p.suffix.lower() == ".zip")):
        return [p]
    out = []
    for child in sorted(p.iterdir()) if p.is_dir() else []:
        if not child.name.startswith("."):
            out += study_paths(child)
    return out


def volume_stats(paths) -> list[dict]:
    """One row per study: slices, size, spacing, HU range, gaps, how it was sorted, transfer syntax."""
    rows = []
    for p in paths:
        v = read_volume(p)
        rows.append({
            "study": str(p), "slices": v.n_slices, "rows": int(v.hu.shape[1]), "columns": int(v.hu.shape[2]),
            "slice_step_mm": round(v.spacing[0], 3), "pixel_spacing_mm": [round(v.spacing[1], 4), round(v.spacing[2], 4)],
            "hu_min": float(v.hu.min()), "hu_max": float(v.hu.max()), "hu_mean": round(float(v.hu.mean()), 1),
            "gaps": len(v.gaps), "sorted_by": v.meta.get("sorted_by", "nifti"), "transfer_syntax": v.meta.get("transfer_syntax", ""),
        })  # fmt: skip
    return rows


def format_volume_stats(rows: list[dict]) -> str:
    lines = ["study  slices  size  step mm  pixel mm  HU min..max (mean)  gaps  sorted by"]
    for r in rows:
        lines.append(
            f"{r['study']}  {r['slices']}  {r['rows']}x{r['columns']}  {r['slice_step_mm']:.2f}  "
            f"{r['pixel_spacing_mm'][0]:.3f}  {r['hu_min']:.0f}..{r['hu_max']:.0f} ({r['hu_mean']:.0f})  {r['gaps']}  {r['sorted_by']}"
        )
    return "\n".join(lines)


def read_volume(path, *, max_zip_bytes: int = MAX_ZIP_BYTES) -> Volume:
    """A series folder, a NIfTI file or a zipped series -> :class:`Volume` (Raises: VolumeError)."""
    path = Path(path)
    if not path.exists():
        raise VolumeError(path, "no such file or folder")
    if path.is_dir():
        files = [p for p in sorted(path.iterdir()) if p.is_file()]
        return series_from_files([(p.name, p) for p in files], str(path))
    if is_nifti(path):
        return read_nifti(path)
    if path.suffix.lower() == ".zip":
        return read_series_zip(path.read_bytes(), str(path), max_bytes=max_zip_bytes)
    raise VolumeError(path, "not a CT study: expected a DICOM series folder, a .nii / .nii.gz file or a .zip of a series")


def read_volume_bytes(data: bytes, name: str, *, max_zip_bytes: int = MAX_ZIP_BYTES) -> Volume:
    """An uploaded study: a zip of a DICOM series, or a NIfTI file (``name`` ends in .nii / .nii.gz)."""
    if data[:4] == b"PK\x03\x04":
        return read_series_zip(data, name, max_bytes=max_zip_bytes)
    if is_nifti(Path(name)):
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:  # nibabel reads files; the upload's name keeps its .gz
            path = Path(tmp) / ("study.nii.gz" if name.lower().endswith(".gz") else "study.nii")
            path.write_bytes(data)
            vol = read_nifti(path)
        vol.source = name
        return vol
    raise VolumeError(name, "not a CT study upload: a .zip of one DICOM series or a .nii / .nii.gz file expected")


def read_series_zip(data: bytes, name: str = "<upload>", *, max_bytes: int = MAX_ZIP_BYTES) -> Volume:
    """A zip of one DICOM series (in memory) -> :class:`Volume`; the uncompressed size is checked first."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = [i for i in zf.infolist() if not i.is_dir()]
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise VolumeError(name, f"not a readable zip ({type(exc).__name__}: {exc})") from exc
    total = sum(i.file_size for i in infos)
    if total > max_bytes:
        raise VolumeError(name, f"zip expands to {total / 1e6:.0f} MB, over the {max_bytes / 1e6:.0f} MB limit")
    members = []
    read = 0
    for info in infos:
        with zf.open(info) as fh:  # read at most the declared size + 1 byte: a lying header cannot expand further
            blob = fh.read(info.file_size + 1)
        read += len(blob)
        if len(blob) > info.file_size or read > max_bytes:
            raise VolumeError(name, f"zip member {info.filename} expands beyond its declared size")
        members.append((info.filename, io.BytesIO(blob)))
    return series_from_files(members, name)


def _slice_normal(ds) -> np.ndarray | None:
    iop = getattr(ds, "ImageOrientationPatient", None)
    if iop is None or len(iop) != 6:
        return None
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    n = np.cross(row, col)
    return n / (np.linalg.norm(n) or 1.0)


def dicom_affine(first, pixel_spacing: list[float], step: float) -> np.ndarray | None:
    """Voxel (column, row, slice) -> RAS mm from the first slice's ImagePositionPatient / ImageOrientationPatient,
    PixelSpacing (row, column) and the slice step along the normal; None without orientation or position."""
    iop, ipp = getattr(first, "ImageOrientationPatient", None), getattr(first, "ImagePositionPatient", None)
    if iop is None or ipp is None or len(iop) != 6 or len(ipp) != 3:
        return None
    x, y = np.asarray(iop[:3], float), np.asarray(iop[3:], float)  # along a row (columns grow), down a column
    n = np.cross(x, y)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = x * pixel_spacing[1], y * pixel_spacing[0], n * step, np.asarray(ipp, float)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM's LPS -> NIfTI's RAS


def _dicom_headers(items, study: str) -> list:
    """``[(name, dataset)]`` of the DICOM images among ``items`` (others skipped with a warning), checked to be
    one series of at least two slices. Raises VolumeError."""
    from covidscan.data.io import dicom_dataset
    from covidscan.errors import ImageReadError

    headers, skipped = [], []
    for name, src in items:
        try:
            ds = dicom_dataset(src, name)
        except ImageReadError as exc:  # a deflated slice over the budget: the study is refused, not skipped
            raise VolumeError(study, exc.cause) from None
        except Exception:  # InvalidDicomError and friends: not a DICOM file
            skipped.append(name)
            continue
        if "PixelData" not in ds:
            skipped.append(name)  # DICOMDIR, structured reports
            continue
        headers.append((name, ds))
    if skipped:
        logger.warning("%s: skipped %d file(s) that are not DICOM images (%s)", study, len(skipped), ", ".join(skipped[:3]))
    if not headers:
        raise VolumeError(study, "no DICOM images found (a CT study is a folder of DICOM slices, a .nii / .nii.gz or a .zip)")
    series = {str(getattr(ds, "SeriesInstanceUID", "")) for _, ds in headers}
    if len(series) > 1:
        raise VolumeError(
            study, f"{len(series)} series mixed in one folder ({', '.join(sorted(series)[:2])}...): one series per folder"
        )
    if len(headers) < 2:
        raise VolumeError(study, "a single slice is not a volume (read it as an image instead)")
    return headers


def series_from_files(items, study: str) -> Volume:
    """``[(name, path or file-like), ...]`` of one DICOM series -> :class:`Volume`."""
    from pydicom.pixels import apply_modality_lut

    from covidscan.data.budget import check_study
    from covidscan.data.io import check_pixel_data_length
    from covidscan.errors import ImageReadError

    headers = _dicom_headers(items, study)
    normal = _slice_normal(headers[0][1])
    if normal is not None and all("ImagePositionPatient" in ds for _, ds in headers):
        pos = [float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))) for _, ds in headers]
        how = "ImagePositionPatient"
    elif all("SliceLocation" in ds for _, ds in headers):
        pos, how = [float(ds.SliceLocation) for _, ds in headers], "SliceLocation"
    else:
        pos, how = [float(getattr(ds, "InstanceNumber", i)) for i, (_, ds) in enumerate(headers)], "InstanceNumber"
    order = np.argsort(pos, kind="stable")
    positions = np.asarray(pos)[order]
    if len(np.unique(positions)) < len(positions):
        raise VolumeError(study, f"two slices share one position ({how}): duplicated files or several series")
    shapes = {(int(ds.Rows), int(ds.Columns)) for _, ds in headers}
    if len(shapes) > 1:
        raise VolumeError(study, f"slices of different sizes {sorted(shapes)}: one series per folder")
    ((rows, cols),) = shapes
    check_study(study, len(headers), rows, cols)  # before any slice is decoded
    slices = []
    for i in order:
        name, ds = headers[i]
        try:
            check_pixel_data_length(ds, name, rows, cols, int(getattr(ds, "NumberOfFrames", 1) or 1), 1)
        except ImageReadError as exc:
            raise VolumeError(study, f"{name}: {exc.cause}") from None
        try:
            arr = ds.pixel_array
        except Exception as exc:  # missing decoder, corrupt pixel data
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
            hint = f"; {DECODER_HINT}" if ts is not None and ts.is_compressed else ""
            raise VolumeError(study, f"cannot decode {name} ({getattr(ts, 'name', ts)}): {msg}{hint}") from exc
        if arr.ndim != 2:
            raise VolumeError(study, f"{name}: expected one 2-D slice per file, got pixel data of shape {arr.shape}")
        slices.append(np.asarray(apply_modality_lut(arr, ds), dtype=np.float32))
    hu = np.stack(slices)
    steps = np.diff(positions)
    step = float(np.median(steps)) if len(steps) else 0.0
    gaps = [(int(i), float(s)) for i, s in enumerate(steps) if step > 0 and s > 1.5 * step]
    if gaps:
        logger.warning(
            "%s: %d gap(s) between slices (largest %.1f mm, usual step %.1f mm)", study, len(gaps), max(s for _, s in gaps), step
        )
    first = headers[order[0]][1]
    ps = [float(v) for v in getattr(first, "PixelSpacing", [1.0, 1.0])]
    meta = {
        key: str(getattr(first, key, "") or "")
        for key in ("PatientID", "PatientAge", "PatientSex", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "Manufacturer")
    }
    meta["sorted_by"] = how
    meta["transfer_syntax"] = str(getattr(getattr(first, "file_meta", None), "TransferSyntaxUID", ""))
    return Volume(
        hu, (step, ps[0], ps[1]), positions, [headers[i][0] for i in order], study, gaps, meta, dicom_affine(first, ps, step)
    )


def read_nifti(path) -> Volume:
    """A NIfTI file -> :class:`Volume` (RAS orientation, slices along the feet-to-head axis)."""
    try:
        import nibabel as nib
    except ImportError as exc:  # pragma: no cover - declared dependency
        raise VolumeError(path, "reading NIfTI needs nibabel (pip install nibabel)") from exc
    try:
        img = nib.load(str(path))
        if len(img.shape) < 3 or (len(img.shape) > 3 and any(s > 1 for s in img.shape[3:])):
            raise VolumeError(path, f"NIfTI of shape {tuple(img.shape)}: a 3-D volume expected")
        from covidscan.data.budget import check_study

        shape = tuple(int(v) for v in img.shape[:3])
        check_study(path, shape[2], shape[1], shape[0])  # from the header, before the data are read
        img = nib.as_closest_canonical(img)  # RAS+: axis 2 runs inferior -> superior
        data = np.asarray(img.get_fdata(dtype=np.float32)).reshape(img.shape[:3])
    except VolumeError:
        raise
    except Exception as exc:  # truncated, not NIfTI
        raise VolumeError(path, f"not a readable NIfTI ({type(exc).__name__}: {exc})") from exc
    if min(data.shape) < 2:
        raise VolumeError(path, f"NIfTI of shape {data.shape}: a 3-D volume expected")
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    # RAS+ (+x towards the patient's right, +y anterior, +z superior) -> displayed like DICOM axial slices:
    # row 0 anterior, column 0 the patient's right (both axes flipped)
    hu = np.ascontiguousarray(np.transpose(data, (2, 1, 0))[:, ::-1, ::-1])
    positions = np.arange(hu.shape[0]) * zooms[2]
    # hu[z, r, c] = canonical[X-1-c, Y-1-r, z]: voxel (c, r, z) -> canonical voxel -> RAS
    nx, ny = data.shape[0], data.shape[1]
    flip = np.array([[-1.0, 0, 0, nx - 1], [0, -1.0, 0, ny - 1], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    names = [f"slice {i}" for i in range(hu.shape[0])]
    return Volume(hu, (zooms[2], zooms[1], zooms[0]), positions, names, str(path), [], {}, np.asarray(img.affine) @ flip)

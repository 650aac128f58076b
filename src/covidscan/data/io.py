"""Reading chest scans (PNG, JPEG, DICOM) into one representation.

Every reader returns a :class:`ScanImage` whose ``pixels`` are ``float32`` in ``[0, 1]``
with shape ``H x W`` (grayscale) or ``H x W x 3`` (colour). Grayscale means *brighter =
denser* (bone is white), whatever the source's photometric convention:

* PNG / JPEG through Pillow. 8-bit values are divided by 255, 16-bit by 65535. Palette
  images are expanded; alpha is dropped after compositing onto black. Colour images whose
  three channels are equal are reduced to grayscale. Pillow's decompression-bomb guard
  stays on (``Image.MAX_IMAGE_PIXELS`` is never changed here).
* DICOM through pydicom: the modality LUT (rescale slope / intercept) is applied, then the
  VOI LUT or the window centre / width when the file has one, then min-max scaling to
  ``[0, 1]``. ``MONOCHROME1`` images are inverted. Multi-frame files give their middle
  frame.

Any corrupt, truncated or non-image file raises :class:`ImageReadError`, whose message
names the file and the cause.
"""

from __future__ import annotations

import io
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from covidscan.data.budget import check_image, image_budget
from covidscan.errors import ImageReadError

logger = logging.getLogger(__name__)

DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff"} | DICOM_SUFFIXES
#: the only formats Pillow may open (its other plugins, GIF, BMP, EPS through Ghostscript ..., are never tried);
#: TIFF because 16-bit radiographs are often exported as TIFF
PILLOW_FORMATS = ("PNG", "JPEG", "TIFF")
#: largest image accepted, checked from the header before any pixel is decoded (rows x columns x frames);
#: 25 megapixels holds a 4,300 x 4,300 detector film or 16 frames of 1,250 x 1,250. ``COVIDSCAN_MAX_PIXELS`` changes it.
DEFAULT_MAX_PIXELS = 25_000_000


def max_pixels() -> int:
    """The pixel limit in force: ``$COVIDSCAN_MAX_PIXELS`` when set (a positive integer), else the default."""
    value = os.environ.get("COVIDSCAN_MAX_PIXELS", "")
    return int(value) if value.isdigit() and int(value) > 0 else DEFAULT_MAX_PIXELS


def check_size(label, width: int, height: int, frames: int = 1, samples: int = 1) -> None:
    """The header's size against the pixel limit and the memory budget (:mod:`covidscan.data.budget`), before
    any pixel is decoded. Raises :class:`ImageReadError` naming ``label``."""
    n = int(width) * int(height) * max(1, int(frames))
    if width <= 0 or height <= 0:
        raise ImageReadError(label, f"image has no pixels ({width} x {height})")
    check_image(label, width, height, samples=samples, frames=frames)
    if n > max_pixels():
        raise ImageReadError(
            label,
            f"image too large: {width} x {height}"
            + (f" x {frames} frames" if frames > 1 else "")
            + f" = {n:,} pixels, over the {max_pixels():,} limit (COVIDSCAN_MAX_PIXELS)",
        )


@dataclass(frozen=True)
class ScanImage:
    """A decoded scan.

    pixels: float32, ``H x W`` or ``H x W x 3``, values in ``[0, 1]``.
    format: container format, ``"PNG"``, ``"JPEG"``, ``"DICOM"`` ...
    mode: the source's pixel mode (Pillow mode such as ``"L"``, ``"I;16"``, ``"RGB"``, or
        the DICOM photometric interpretation such as ``"MONOCHROME1"``).
    hu: for a CT DICOM (``Modality`` CT), the Hounsfield units before any window; a CT model maps
        them with its own lung window (``Preprocess.hu_window``), as it does a study's slices.
    """

    pixels: np.ndarray
    format: str
    mode: str
    path: Path
    hu: np.ndarray | None = None  # a CT DICOM's Hounsfield units (modality LUT applied), ``H x W`` float32

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def is_color(self) -> bool:
        return self.pixels.ndim == 3


def has_dicom_preamble(head: bytes) -> bool:
    """The DICOM Part 10 marker, ``DICM`` after the 128-byte preamble (the content, not the file name)."""
    return len(head) >= 132 and head[128:132] == b"DICM"


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    with open(path, "rb") as fh:
        return has_dicom_preamble(fh.read(132))


def read_image(path: str | Path) -> ScanImage:
    """Read a PNG, JPEG (or other Pillow format) or DICOM file; see the module docstring."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise ImageReadError(path, "is a directory, not an image file")
    try:
        if _is_dicom(path):
            return _read_dicom(path)
        return _read_pillow(path)
    except (ImageReadError, FileNotFoundError, Image.DecompressionBombError):
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, TypeError) as exc:
        raise ImageReadError(
            path, f"not a readable image: PNG, JPEG, TIFF or DICOM expected ({type(exc).__name__}: {exc})"
        ) from exc


def read_bytes(data: bytes, name: str = "<upload>") -> ScanImage:
    """Read an image from memory (an upload); the content is sniffed, never the name."""
    if has_dicom_preamble(data):
        try:
            return _read_dicom(io.BytesIO(data), name=name)
        except ImageReadError:
            raise
        except Exception as exc:  # pydicom raises many types for bad data
            raise ImageReadError(name, f"not a readable DICOM ({type(exc).__name__}: {exc})") from exc
    try:
        return _read_pillow(io.BytesIO(data), name=name)
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, TypeError) as exc:
        # Pillow names the in-memory buffer (<_io.BytesIO object at 0x...>): say "the upload" instead
        cause = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "the upload", str(exc))
        raise ImageReadError(
            name, f"not a readable image: PNG, JPEG, TIFF or DICOM expected ({type(exc).__name__}: {cause})"
        ) from exc


def _read_pillow(src, name: str | None = None) -> ScanImage:
    label = name or src
    with warnings.catch_warnings():
        # A DecompressionBombWarning (between 1x and 2x the limit) becomes an error too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(src, formats=PILLOW_FORMATS) as im:
                bands = 4 if im.mode in ("P", "PA") else len(im.getbands())  # a palette expands to RGB(A)
                check_size(label, im.width, im.height, getattr(im, "n_frames", 1), bands)  # header only: nothing decoded yet
                im.load()  # forces a full decode: truncated files fail here
                fmt = im.format or "unknown"
                mode = im.mode
                pixels = _pillow_to_array(im, label)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageReadError(label, f"image too large (decompression-bomb guard): {exc}") from exc
    return ScanImage(pixels=pixels, format=fmt, mode=mode, path=Path(str(label)))


def _pillow_to_array(im: Image.Image, label) -> np.ndarray:
    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
    if mode in ("LA", "RGBA", "PA"):
        # Composite onto black: alpha carries no radiographic information.
        arr = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
        rgb = arr[..., :3] * arr[..., 3:4]
        return _maybe_gray(rgb)
    if mode in ("1", "L"):
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(im, dtype=np.uint16).astype(np.float32)
        return arr / 65535.0
    if mode == "I":
        arr = np.asarray(im, dtype=np.int64).astype(np.float32)
        # 16-bit PNGs often decode as mode I; values above 65535 mean a real 32-bit image.
        top = 65535.0 if arr.max(initial=0) <= 65535 else float(arr.max())
        return np.clip(arr, 0, None) / top
    if mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        return _minmax(arr)
    if mode in ("RGB", "CMYK", "YCbCr", "LAB", "HSV"):
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        return _maybe_gray(arr)
    raise ImageReadError(label, f"unsupported pixel mode {mode!r}")


def _maybe_gray(rgb: np.ndarray) -> np.ndarray:
    """Reduce an ``H x W x 3`` array to ``H x W`` when its channels are equal."""
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
        return np.ascontiguousarray(rgb[..., 0])
    return np.ascontiguousarray(rgb)


def _minmax(arr: np.ndarray) -> np.ndarray:
    arr = arr.astype(np.float32)
    lo, hi = float(np.min(arr)), float(np.max(arr))
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ValueError("pixel data holds non-finite values")
    if hi <= lo:
        return np.zeros_like(arr, dtype=np.float32)
    return (arr - lo) / (hi - lo)


def _read_dicom(src, name: str | None = None) -> ScanImage:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, convert_color_space

    label = name or src
    try:
        ds = dicom_dataset(src, label)
    except ImageReadError:
        raise
    except Exception as exc:  # InvalidDicomError and friends
        raise ImageReadError(label, f"not a readable DICOM ({type(exc).__name__}: {exc})") from exc
    if "PixelData" not in ds:
        raise ImageReadError(label, "DICOM file has no pixel data")
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    rows, cols, spp = int(getattr(ds, "Rows", 0)), int(getattr(ds, "Columns", 0)), int(getattr(ds, "SamplesPerPixel", 1) or 1)
    check_size(label, cols, rows, frames, spp)
    check_pixel_data_length(ds, label, rows, cols, frames, spp)
    try:
        arr = ds.pixel_array
    except Exception as exc:
        raise ImageReadError(label, f"cannot decode DICOM pixel data ({type(exc).__name__}: {exc})") from exc
    want = (rows, cols) if frames == 1 else (frames, rows, cols)
    if tuple(arr.shape[: len(want)]) != want:
        raise ImageReadError(
            label, f"decoded pixel data of shape {arr.shape} disagrees with the header ({frames} x {rows} x {cols})"
        )
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422"):
        if frames > 1:
            arr = arr[frames // 2]
        if photometric != "RGB":
            arr = convert_color_space(arr, photometric, "RGB")
        return ScanImage(_maybe_gray(_minmax(arr)), "DICOM", photometric, Path(str(label)))
    if frames > 1:
        logger.info("%s: %d frames, using the middle one", label, frames)
        arr = arr[frames // 2]
    arr = apply_modality_lut(arr, ds)  # rescale slope / intercept -> e.g. Hounsfield units
    hu = np.asarray(arr, dtype=np.float32) if str(getattr(ds, "Modality", "")).upper() == "CT" else None
    if "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds):
        arr = apply_voi_lut(arr, ds)
    pixels = _minmax(np.asarray(arr, dtype=np.float32))
    if photometric == "MONOCHROME1":
        pixels = 1.0 - pixels
    return ScanImage(pixels=pixels, format="DICOM", mode=photometric, path=Path(str(label)), hu=hu)


DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian: the whole dataset is zlib-compressed


def dicom_dataset(src, label):
    """Read a DICOM file (path or file-like). A deflated one is inflated here, in a stream that stops at the
    image budget (pydicom would inflate it whole first: a 1 MB file can hold a 1 GB dataset).

    Raises:
        ImageReadError: a deflated dataset that inflates beyond the budget, or does not inflate.
    """
    import zlib

    import pydicom
    from pydicom.filereader import _read_file_meta_info, read_dataset
    from pydicom.uid import ExplicitVRLittleEndian

    fp = open(src, "rb") if isinstance(src, str | Path) else src
    try:
        start = fp.tell()
        head = fp.read(132)
        if not has_dicom_preamble(head):
            fp.seek(start)
            return pydicom.dcmread(fp)
        meta = _read_file_meta_info(fp)
        if str(getattr(meta, "TransferSyntaxUID", "")) != DEFLATED:
            fp.seek(start)
            return pydicom.dcmread(fp)
        limit = image_budget() + 65536  # the pixels plus room for the other elements
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        out, size = [], 0
        while chunk := fp.read(1 << 16):
            piece = inflater.decompress(chunk, limit + 1 - size)
            out.append(piece)
            size += len(piece)
            if size > limit or inflater.unconsumed_tail:
                raise ImageReadError(label, f"deflated DICOM inflates beyond the {image_budget() / 2**20:,.0f} MiB image budget")
        ds = read_dataset(io.BytesIO(b"".join(out)), is_implicit_VR=False, is_little_endian=True)
    except zlib.error as exc:
        raise ImageReadError(label, f"deflated DICOM does not inflate ({exc})") from exc
    finally:
        if fp is not src:
            fp.close()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def check_pixel_data_length(ds, label, rows: int, cols: int, frames: int, spp: int) -> None:
    """Uncompressed pixel data must hold what the header declares (a DICOM with more frames of data than it
    says is refused, naming the file, instead of failing later inside the model)."""
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is not None and ts.is_compressed:
        return
    bits = int(getattr(ds, "BitsAllocated", 8) or 8)
    want = (rows * cols * frames * spp * bits + 7) // 8
    got = len(ds.PixelData)
    if got not in (want, want + 1):  # one byte of padding to an even length
        raise ImageReadError(label, f"pixel data holds {got:,} bytes, the header declares {want:,} ({frames} x {rows} x {cols})")


def is_image_file(path: Path) -> bool:
    """True when ``path`` has a suffix covidscan scans for when listing a class folder."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def expand_paths(paths: list[Path]) -> list[Path]:
    """Files as given; folders expanded to the image files under them (sorted; hidden files left out)."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".") and is_image_file(f))
        else:
            out.append(p)
    return out

"""Memory budgets: what a decoder may allocate, checked from headers before anything is decoded.

* **An image** (PNG, JPEG, TIFF, DICOM in any transfer syntax): its decoded pixels as float32, rows x columns
  x samples x frames x 4 bytes, at most :func:`image_budget` (``COVIDSCAN_MAX_IMAGE_MB``, default 96 MiB: a
  4,900 x 4,900 detector film, or an 8-megapixel colour photograph). A deflated DICOM is inflated in a stream
  that stops at the budget; the pixel data a DICOM holds must match what its header declares.
* **A study** (DICOM series folder or zip, NIfTI): every slice in Hounsfield units as float32, at most
  :func:`study_budget` (``COVIDSCAN_MAX_STUDY_MB``, default 1,024 MiB: 1,000 slices of 512 x 512).

Decoding takes a few times the budget at its peak (the raw array, the float copy, the gray copy); the
service multiplies that by the predictions it admits at once and keeps the product under its
``--memory-budget`` (:func:`admissible_pending`).
"""

from __future__ import annotations

import os

from covidscan.errors import ImageReadError

MIB = 1024 * 1024
DEFAULT_IMAGE_MB = 96
DEFAULT_STUDY_MB = 1024
PEAK_FACTOR = 3  # peak bytes of one decode / the float32 pixels it makes (raw + float + gray), measured ~2.5


def _env_mb(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return (int(value) if value.isdigit() and int(value) > 0 else default) * MIB


def image_budget() -> int:
    """Bytes an image's decoded float32 pixels may take (``COVIDSCAN_MAX_IMAGE_MB``)."""
    return _env_mb("COVIDSCAN_MAX_IMAGE_MB", DEFAULT_IMAGE_MB)


def study_budget() -> int:
    """Bytes a study's slices may take as float32 Hounsfield units (``COVIDSCAN_MAX_STUDY_MB``)."""
    return _env_mb("COVIDSCAN_MAX_STUDY_MB", DEFAULT_STUDY_MB)


def check_image(label, width: int, height: int, *, samples: int = 1, frames: int = 1) -> None:
    """Raises :class:`ImageReadError` naming ``label`` for an image with no pixels or over :func:`image_budget`."""
    width, height, samples, frames = int(width), int(height), max(1, int(samples)), max(1, int(frames))
    if width <= 0 or height <= 0:
        raise ImageReadError(label, f"image has no pixels ({width} x {height})")
    need = width * height * samples * frames * 4
    if need > image_budget():
        shape = (
            f"{width} x {height}"
            + (f" x {samples} samples" if samples > 1 else "")
            + (f" x {frames} frames" if frames > 1 else "")
        )
        raise ImageReadError(
            label,
            f"image too large: {shape} needs {need / MIB:,.0f} MiB decoded, over the {image_budget() / MIB:,.0f} MiB "
            "budget (COVIDSCAN_MAX_IMAGE_MB)",
        )


def check_study(label, slices: int, rows: int, columns: int) -> None:
    """Raises VolumeError naming ``label`` for a study over :func:`study_budget`."""
    from covidscan.errors import VolumeError

    need = int(slices) * int(rows) * int(columns) * 4
    if need > study_budget():
        raise VolumeError(
            label,
            f"study too large: {slices} slices of {rows} x {columns} need {need / MIB:,.0f} MiB in Hounsfield units, over the "
            f"{study_budget() / MIB:,.0f} MiB budget (COVIDSCAN_MAX_STUDY_MB)",
        )


def admissible_pending(memory_budget: int, *, studies: bool = False) -> int:
    """How many predictions may run or wait at once within ``memory_budget`` bytes: each may decode one image
    (or, for a CT model, one study) at :data:`PEAK_FACTOR` times its budget."""
    per = PEAK_FACTOR * (study_budget() if studies else image_budget())
    return max(0, int(memory_budget // per))


def machine_memory() -> int:
    """Physical memory of this machine in bytes (0 when unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0

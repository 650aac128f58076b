"""Data layer: image I/O, manifests, statistics, splits, transforms and datasets."""

from covidscan.data.io import ImageReadError, ScanImage, read_bytes, read_image
from covidscan.data.manifest import DatasetIndex, Record, exclude_sources, load_dataset
from covidscan.data.splits import Split, grouped_split, paper_split, read_split, write_split
from covidscan.data.stats import compute_stats, format_stats

__all__ = [
    "DatasetIndex",
    "ImageReadError",
    "Record",
    "ScanImage",
    "Split",
    "compute_stats",
    "exclude_sources",
    "format_stats",
    "grouped_split",
    "load_dataset",
    "paper_split",
    "read_bytes",
    "read_image",
    "read_split",
    "write_split",
]

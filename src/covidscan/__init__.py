"""covidscan: COVID-19 detection on chest X-ray and CT by transfer learning.

Research use only. covidscan is not a medical device and must not be used for
diagnosis or treatment decisions.

Reproduces and extends Berrimi et al. (2021), "COVID-19 detection from Xray and CT
scans using transfer learning".

The Python API, imported on first use (so ``import covidscan`` stays light)::

    from covidscan import Predictor, read_image, load_dataset, load_config, train, evaluate
"""

from __future__ import annotations

import importlib

__version__ = "0.3.0"

_API = {
    "Predictor": "covidscan.inference",
    "Prediction": "covidscan.inference",
    "read_image": "covidscan.data",
    "load_dataset": "covidscan.data",
    "load_config": "covidscan.config",
    "train": "covidscan.training",
    "evaluate": "covidscan.evaluation",
    "calibrate": "covidscan.adapt",
    "CovidscanError": "covidscan.errors",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):  # PEP 562: load the model stack only when it is asked for
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'covidscan' has no attribute {name!r}")

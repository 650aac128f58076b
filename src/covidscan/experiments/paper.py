"""Berrimi et al. (2021) as data: the three models, the two protocols and the reported accuracies.

Plain constants (no torch), so the command line can offer them as choices without loading the
model stack.
"""

from __future__ import annotations

from covidscan.config import PROTOCOLS  # the paper's image-level split and covidscan's grouped one

__all__ = ["PAPER_ACCURACY", "PAPER_MODELS", "PROTOCOLS"]

#: Accuracy (%) reported by Berrimi et al. (2021), Tables III and IV.
PAPER_ACCURACY = {
    "xray": {"densenet": 63.56, "inception_v3": 92.35, "new_densenet": 85.0},
    "ct": {"densenet": 60.0, "inception_v3": 84.51, "new_densenet": 95.98},
}
#: model name -> (backbone, head)
PAPER_MODELS = {
    "densenet": ("densenet121", "linear"),
    "inception_v3": ("inception_v3", "linear"),
    "new_densenet": ("densenet121", "paper"),
}

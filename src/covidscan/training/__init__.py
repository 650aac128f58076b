"""The training wing: everything that makes a checkpoint, and nothing that uses one needs.

* :mod:`~covidscan.training.loop`: :func:`train`, the one loop for every backbone, head and task;
* :mod:`~covidscan.training.data`: the split, decoded images, epoch order and device batches;
* :mod:`~covidscan.training.steps`: one epoch, validation, precise BatchNorm;
* :mod:`~covidscan.training.keeper`: the run folder, checkpoints, history, resume;
* :mod:`~covidscan.training.ensemble`: :func:`train_ensemble`;
* :mod:`~covidscan.training.lungseg`: the lung segmenter's training;
* :mod:`~covidscan.training.preview`: the augmentation figure (paper Fig. 5).

Imports run one way: the CLI and the experiments import this wing; it imports the use side (predict,
checkpoint, models, data); nothing on the use side imports it.
"""

from covidscan.training.ensemble import train_ensemble
from covidscan.training.loop import TrainResult, train

__all__ = ["TrainResult", "train", "train_ensemble"]

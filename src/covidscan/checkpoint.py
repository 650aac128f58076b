"""Checkpoints: state dict + metadata (placeholder until the training layer lands)."""


class CheckpointError(ValueError):
    """A file is not a usable covidscan checkpoint; the message says why."""

"""The covidscan error family: every error the library raises on purpose derives from
:class:`CovidscanError`, so a caller (the CLI, a notebook, the web service) can catch them
all in one place. Each also derives from the built-in type it used to be (``ValueError``,
``RuntimeError``), so existing ``except ValueError`` code keeps working.

The CLI turns any of them into one line, ``covidscan: error: <message>``, and exit status 2.
"""

from __future__ import annotations

from pathlib import Path


class CovidscanError(Exception):
    """Base class of every error covidscan raises on purpose; the message says what to do."""


class ConfigError(CovidscanError, ValueError):
    """A recipe or an override is invalid (unknown key, wrong type, value out of range)."""


class DataError(CovidscanError, ValueError):
    """A dataset cannot be used as given (bad manifest, unknown label, empty class, bad split)."""


class ImageReadError(DataError):
    """A file could not be read as an image; the message names the file and the cause."""

    def __init__(self, path: str | Path, cause: str):
        self.path = Path(path)
        self.cause = cause
        super().__init__(f"{path}: {cause}")


class CheckpointError(CovidscanError, ValueError):
    """A file is not a usable covidscan checkpoint; the message says why."""


class WeightsUnavailableError(CovidscanError, RuntimeError):
    """ImageNet weights were asked for and none could be found; the message says how to provide them."""


class CLIError(CovidscanError):
    """A command-line usage problem that argparse cannot see (arguments that contradict each other)."""


class VolumeError(DataError):
    """A study that cannot be read as one CT volume."""

    def __init__(self, study, reason: str):
        self.study, self.reason = str(study), reason
        super().__init__(f"{study}: {reason}")

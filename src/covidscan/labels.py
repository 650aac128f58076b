"""Class lists per task: the one source of truth.

``xray``: three classes as in Berrimi et al. (2021), Table I.
``ct``: two classes as in Table II; ``normal`` means *non-COVID* (Soares et al. 2020),
which may include other lung disease.
"""

from __future__ import annotations

TASKS: dict[str, tuple[str, ...]] = {
    "xray": ("covid", "pneumonia", "normal"),
    "ct": ("covid", "normal"),
}

#: The class treated as "positive" for sensitivity / specificity summaries.
POSITIVE_CLASS = "covid"


def class_names(task: str) -> tuple[str, ...]:
    """Return the fixed, ordered class list of ``task``; index = model output index."""
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}") from None


def check_label(label: str, task: str) -> int:
    """Return the index of ``label`` in ``task``'s class list, or raise with the allowed ones."""
    names = class_names(task)
    if label not in names:
        raise ValueError(f"unknown label {label!r} for task {task!r}; allowed labels: {', '.join(names)}")
    return names.index(label)

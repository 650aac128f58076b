"""Subcommands that need the model stack (train, evaluate, predict ...)."""

from __future__ import annotations


def register(sub) -> None:
    pass

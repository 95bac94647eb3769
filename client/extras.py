"""Optional dependencies of `gradserve train` (the `train` extra), imported on first use."""

from __future__ import annotations

import importlib

TRAIN_EXTRA_HINT = "pip install 'gradserve[train]'"


class MissingExtra(ModuleNotFoundError):
    """An optional dependency is not installed; the message says what to install."""


def import_optional(module: str, package: str, needed_for: str):
    """Import `module`, or raise MissingExtra naming the package and the extra to install."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        raise MissingExtra(f"{needed_for} needs {package}, which is not installed: "
                           f"{TRAIN_EXTRA_HINT}", name=module) from err

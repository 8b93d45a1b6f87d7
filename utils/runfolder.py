"""Run folders that are never shared by accident: unique names for timestamped folders."""
from __future__ import annotations

import os
from pathlib import Path

MAX_SUFFIX = 1000


def create_unique_folder(parent: str | os.PathLike, name: str) -> Path:
    """Create ``parent/name``, or ``parent/name-2``, ``-3``, ... when it exists (two runs
    started in the same second): ``mkdir`` is atomic, so two processes never get the same one.

    Returns:
        The folder created.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    for k in range(1, MAX_SUFFIX + 1):
        candidate = parent / (name if k == 1 else f"{name}-{k}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"{parent} already holds {MAX_SUFFIX} folders named {name}-*; pass --experiment")

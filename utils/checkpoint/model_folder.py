"""Reading Hub-style model folders (``config.json`` + ``model.safetensors``, written by
:mod:`utils.checkpoint.hub`) as checkpoint dictionaries. JSON and safetensors only: no pickle
is read anywhere on this path.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from models.factory import create_cascade
from models.pretrained import state_dict_mismatch
from models.registry import MODEL_CFGS

from ..errors import CheckpointError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Entries of a checkpoint dictionary kept in config.json's "dvt" section.
RESULT_KEYS = ("flops", "anytime_classification", "dynamic_threshold", "budgeted_batch_classification")


def is_model_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding a ``config.json``."""
    return (Path(path) / CONFIG_FILE).is_file()


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        raise CheckpointError(f"{path} is not a model config (no 'architecture')")
    if config["architecture"] not in MODEL_CFGS:
        raise CheckpointError(f"{path} is for {config['architecture']!r}, not a DVT model "
                              f"({', '.join(MODEL_CFGS)})")
    return config


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} has {CONFIG_FILE} but no {WEIGHTS_FILE}")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path} (not a safetensors file, or damaged): {e}") from None


def check_folder_weights(folder: Path, config: Mapping[str, Any], weights: Mapping[str, torch.Tensor]) -> None:
    """The weights have exactly the keys and shapes of the model ``config`` describes (built on
    the meta device: no memory, no initialisation)."""
    kwargs = {**config.get("model_args", {}), "num_classes": config.get("num_classes", 1000)}
    with torch.device("meta"):
        expected = create_cascade(config["architecture"], **kwargs).state_dict()
    mismatch = state_dict_mismatch(weights, expected, source="file")
    if mismatch:
        raise CheckpointError(f"{folder / WEIGHTS_FILE} does not fit {folder / CONFIG_FILE} "
                              f"({config['architecture']}): {mismatch}")


def read_model_folder(folder: str | os.PathLike) -> dict[str, Any]:
    """A model folder as a checkpoint dictionary, like a released file of this project:
    ``model_name``, ``model_kwargs``, ``model_state_dict``, the stored results (:data:`RESULT_KEYS`)
    and ``class_names``. Reads JSON and safetensors only.

    Raises:
        CheckpointError: no readable config, weights that do not fit it.
    """
    folder = Path(folder)
    config = _read_config(folder)
    weights = _read_weights(folder)
    check_folder_weights(folder, config, weights)
    dvt = config.get("dvt") or {}
    checkpoint: dict[str, Any] = {
        "model_name": config["architecture"],
        "model_kwargs": {**config.get("model_args", {}), "num_classes": config.get("num_classes", 1000)},
        "model_state_dict": weights,
    }
    for key in RESULT_KEYS:
        if dvt.get(key) is not None:
            checkpoint[key] = dvt[key]
    if "dynamic_threshold" in checkpoint:
        checkpoint["dynamic_threshold"] = torch.tensor(checkpoint["dynamic_threshold"], dtype=torch.float32)
    names = config.get("label_names") or (config.get("pretrained_cfg") or {}).get("label_names")
    if names:
        checkpoint["class_names"] = list(names)
    return checkpoint

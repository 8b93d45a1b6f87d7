"""Class names of a classifier, in timm's convention.

A model carries its dataset's class names as ``pretrained_cfg["label_names"]`` (checkpoints
of this project store them under the key ``class_names``); a 1,000-class model without names
is taken to be an ImageNet-1k model and gets the names timm ships (``ImageNetInfo``). Labels
are produced by timm's ``DatasetInfoLabelMapper``, with its label types: ``name`` (the class
name; the WordNet id for ImageNet), ``description`` (the same for custom names; the lemmas
for ImageNet, e.g. ``tench, Tinca tinca``) and ``detailed`` (lemmas and definition), or
``none``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch.nn as nn
from timm.data import CustomDatasetInfo, DatasetInfo, DatasetInfoLabelMapper, ImageNetInfo, infer_imagenet_subset

from .errors import CheckpointError, ConfigError

LABEL_TYPES = ("description", "name", "detailed", "none")
CHECKPOINT_KEY = "class_names"


def check_class_names(names: Any, num_classes: int, source: str) -> list[str]:
    """``names`` as a list of ``num_classes`` strings, or a ConfigError naming ``source``."""
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{source}: class names must be a list of strings")
    if len(names) != num_classes:
        raise ConfigError(f"{source} lists {len(names)} class names, but the model has {num_classes} classes")
    return list(names)


def read_class_names(path: str | os.PathLike) -> list[str]:
    """Class names from a file: a JSON list (``.json``), or one name per line (blank lines
    at the end are ignored); a line's position is its class index."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read class names from {path}: {e}") from None
    if path.suffix.lower() == ".json":
        try:
            names = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"{path} must hold a JSON list of class names")
        return names
    return text.rstrip("\r\n").splitlines() if text.strip() else []


def attach_class_names(model: nn.Module, checkpoint: dict, source: str,
                       override: Optional[Sequence[str] | str | os.PathLike] = None) -> None:
    """Put the class names in ``model.pretrained_cfg["label_names"]``: those of ``override``
    (a list, or a file for :func:`read_class_names`), else the checkpoint's ``class_names``."""
    num_classes = model.num_classes
    if override is not None:
        names = override if isinstance(override, (list, tuple)) else read_class_names(override)
        label = "class names" if isinstance(override, (list, tuple)) else str(override)
        _set_label_names(model, check_class_names(names, num_classes, label))
    elif checkpoint.get(CHECKPOINT_KEY) is not None:
        try:
            names = check_class_names(checkpoint[CHECKPOINT_KEY], num_classes, f"{source} ({CHECKPOINT_KEY!r})")
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        _set_label_names(model, names)


def _set_label_names(model: nn.Module, names: list[str]) -> None:
    # a new dict: a configuration may be shared with other models built from the same name
    model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}), "label_names": names}


def dataset_info(model: nn.Module) -> Optional[DatasetInfo]:
    """timm's description of the model's classes: its own names, ImageNet's for a model of
    an ImageNet class count without names, else None."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    if cfg.get("label_names"):
        return CustomDatasetInfo(label_names=cfg["label_names"], label_descriptions=cfg.get("label_descriptions"))
    subset = infer_imagenet_subset({"num_classes": getattr(model, "num_classes", None)})
    return ImageNetInfo(subset) if subset is not None else None


def label_mapper(model: nn.Module, label_type: str = "description") -> Optional[Callable[[int], str]]:
    """Class index -> label of ``label_type`` (see the module docstring), or None when the
    model's classes have no names or ``label_type`` is ``none``."""
    if label_type not in LABEL_TYPES:
        raise ConfigError(f"unknown label type {label_type!r}; choose one of: {', '.join(LABEL_TYPES)}")
    info = dataset_info(model) if label_type != "none" else None
    if info is None:
        return None
    return DatasetInfoLabelMapper(info, label_type=label_type)

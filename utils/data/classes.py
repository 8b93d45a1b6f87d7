"""Class names: the labels a model was trained with are the labels it is evaluated with, and
the class names of a classifier in timm's convention."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch.nn as nn
from timm.data import CustomDatasetInfo, DatasetInfo, DatasetInfoLabelMapper, ImageNetInfo, infer_imagenet_subset

from ..errors import CheckpointError, ConfigError, DataError


def compare_classes(first: Sequence[str], second: Sequence[str], first_name: str, second_name: str) -> Optional[str]:
    """None when both lists hold the same names in the same order; else what differs."""
    first, second = list(first), list(second)
    if first == second:
        return None
    only_first = [c for c in first if c not in set(second)]
    only_second = [c for c in second if c not in set(first)]
    parts = []
    if only_first:
        parts.append(f"only in {first_name}: {_few(only_first)}")
    if only_second:
        parts.append(f"only in {second_name}: {_few(only_second)}")
    if not parts:
        moved = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
        parts.append(f"the same names in another order (class {moved} is {first[moved]!r} in {first_name}, "
                     f"{second[moved]!r} in {second_name})")
    return f"{first_name} has {len(first)} classes, {second_name} {len(second)}; " + "; ".join(parts)


def _few(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_split_classes(train: Sequence[str], val: Sequence[str], root: str, train_name: str = "train",
                        val_name: str = "val") -> None:
    """Training and validation folders hold the same classes in the same order.

    Args:
        train: the training split's class names.
        val: the validation split's.
        root: the dataset folder, for the message.
        train_name: the training split's folder name.
        val_name: the validation split's.

    Raises:
        DataError: listing the classes found in only one of them.
    """
    diff = compare_classes(train, val, f"{train_name}/", f"{val_name}/")
    if diff:
        raise DataError(f"the class folders of {train_name}/ and {val_name}/ in {root} differ, so their labels would "
                        f"not match: {diff}; give both the same class folders")


def check_checkpoint_classes(
        stored_names: Optional[Sequence[str]],
        num_heads: int,
        dataset_names: Sequence[str],
        source: str,
        allow_mismatch: bool = False,
        flag: str = "--allow_class_mismatch",
) -> Optional[str]:
    """The dataset's classes are the checkpoint's: by name when the checkpoint stores names,
    by count otherwise.

    Args:
        stored_names: the checkpoint's ``class_names``, or None.
        num_heads: outputs of the model's classifiers.
        dataset_names: the dataset's classes, in label order.
        source: the checkpoint, for the messages.
        allow_mismatch: go on (with a warning) when the labels can still be scored.
        flag: the option that allows it, for the message.

    Returns:
        A warning to show when a mismatch was allowed, else None.

    Raises:
        DataError: the classes differ and ``allow_mismatch`` is off, or the dataset has labels
            the heads cannot output.
    """
    if stored_names is not None:
        diff = compare_classes(list(stored_names), dataset_names, "the checkpoint", "the dataset")
    elif num_heads != len(dataset_names):
        diff = f"the checkpoint's heads have {num_heads} classes, the dataset {len(dataset_names)}"
    else:
        diff = None
    if diff is None:
        return None
    if len(dataset_names) > num_heads:
        raise DataError(f"{source}: the dataset has {len(dataset_names)} classes, more than the model's heads "
                        f"({num_heads}); labels from {num_heads} on cannot be scored ({diff})")
    if not allow_mismatch:
        raise DataError(f"{source} was trained on other classes than this dataset's ({diff}); the accuracies "
                        f"would compare shifted labels. Pass {flag} if the labels do match")
    return f"warning: {diff}; evaluating anyway ({flag})"


def numbered_classes(names: Sequence[str]) -> bool:
    """Whether class folders are named by label numbers, ``0`` to ``N - 1`` (ImageNet-V2's layout),
    with more than ten of them, so that the text order a folder dataset sorts them in (0, 1, 10,
    100, ...) is not the numbers' order."""
    return len(names) > 10 and set(names) == {str(i) for i in range(len(names))}


def label_by_number(dataset: Any) -> None:
    """Relabel a folder dataset (ImageFolder or tar shards) whose class folders are numbered
    (:func:`numbered_classes`): each image's label becomes its folder's number instead of the
    folder's place in text order."""
    number = [int(name) for name in dataset.classes]  # label in text order -> the folder's number
    dataset.samples = [(path, number[t]) for path, t in dataset.samples]
    dataset.targets = [t for _, t in dataset.samples]
    if hasattr(dataset, "imgs"):  # torchvision's other name for the samples
        dataset.imgs = dataset.samples
    if hasattr(dataset, "reader"):  # tar shards read their labels from timm's reader
        dataset.reader.targets = np.asarray(number)[dataset.reader.targets]
    dataset.classes = sorted(dataset.classes, key=int)
    dataset.class_to_idx = {name: int(name) for name in dataset.classes}


def label_numbered_folders(dataset: Any, trained_names: Optional[Sequence[str]], split: str = "val") -> Optional[str]:
    """Label ``dataset`` (the ``split`` of a dataset folder) by its folders' numbers
    (:func:`label_by_number`) when they are numbered 0 to N - 1 and the checkpoint was not trained
    on folders of those very names (``trained_names``, its ``class_names``): the numbers are then
    the model's class indices, as in ImageNet-V2. Returns the line that says so, or None."""
    names = list(dataset.classes)
    if not numbered_classes(names) or list(trained_names or []) == names:
        return None
    label_by_number(dataset)
    return (f"{split}/ has class folders numbered 0 to {len(names) - 1} (ImageNet-V2's layout): each image is "
            "labelled by its folder's number, the model's class of that index")


def few_classes_warning(num_classes: int) -> Optional[str]:
    """A warning for a dataset with fewer than two classes (nothing to classify)."""
    if num_classes < 2:
        return (f"the dataset has only {num_classes} class: every prediction is right by construction; "
                "add class folders for a meaningful run")
    return None


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

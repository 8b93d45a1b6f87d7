"""Class safety: the labels a model was trained with are the labels it is evaluated with.

An ImageFolder numbers its classes by sorted folder name, so a validation folder that lacks
a class, or names one differently, shifts every label after it without any error. These
checks compare class lists (names when both sides have them, counts otherwise) and say what
differs.
"""
from __future__ import annotations

from typing import Optional, Sequence

from .errors import DataError


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


def few_classes_warning(num_classes: int) -> Optional[str]:
    """A warning for a dataset with fewer than two classes (nothing to classify)."""
    if num_classes < 2:
        return (f"the dataset has only {num_classes} class: every prediction is right by construction; "
                "add class folders for a meaningful run")
    return None

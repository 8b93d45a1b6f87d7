"""Checks made before a run writes anything or starts long work.

Each raises the error type whose one ``error: ...`` line the command-line tools print, naming
the file at fault and what to do. None of them changes anything on disk.
:func:`check_before_run` makes those of a training run.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence

import torch

from ..checkpoint.files import load_checkpoint_file
from ..checkpoint.training import check_not_rewinding, check_resumable, require_training_checkpoint, state_layout
from ..checkpoint.weights import check_state_dict, head_classes
from ..data.cifar import CIFAR_NUM_CLASSES
from ..data.classes import check_split_classes
from ..data.folders import split_dir
from ..data.scan import list_classes
from ..data.shards import tar_split
from ..errors import CheckpointError, ConfigError, DataError
from ..precision import Precision, resolve_precision
from ..train.model import check_eval_metric, create_dvt, start_weights
from .folder import LAST

MiB = 2 ** 20


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_folder(folder: str | os.PathLike, need_bytes: int = 0, flag: str = "--output",
                        label: Optional[str] = None) -> None:
    """``folder`` (existing or to be created) can hold the run's files.

    Args:
        folder: where the files will go.
        need_bytes: free space the run needs there (0: no check).
        flag: the option that named the folder, for the message.
        label: how the message names what was asked for (default: ``flag folder``).

    Raises:
        ConfigError: a file where a folder is needed, a folder that cannot be written, or too
            little free space.
    """
    folder = Path(folder)
    label = label or f"{flag} {folder}"
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        what = "is a file" if existing.is_file() else "is not a folder"
        raise ConfigError(f"{label}: {existing} {what}; pass a folder (it is created if missing)")
    reason = None
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        reason = "it is on a read-only file system"
    elif not os.access(existing, os.W_OK | os.X_OK):
        reason = "permission denied"
    if reason:
        raise ConfigError(f"{label}: cannot write in {existing} ({reason}); pass a writable folder with {flag}")
    if need_bytes > 0:
        free = shutil.disk_usage(existing).free
        if free < need_bytes:
            raise ConfigError(f"{label}: {free / MiB:.1f} MiB free on its disk, the run needs about "
                              f"{need_bytes / MiB:.1f} MiB (two checkpoints); free some space or pass another "
                              + flag)


def check_writable_file(path: str | os.PathLike, flag: str) -> None:
    """``path`` can be written as a file (its folder is created if missing)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; pass a file name")
    check_output_folder(path.parent, 0, flag, label=f"{flag} {path}")


def checkpoint_bytes(model: torch.nn.Module, copies: int = 4) -> int:
    """Size of a training checkpoint of ``model``: ``copies`` float32 copies of its weights
    (model, EMA and the two AdamW moments by default), plus a little for the rest."""
    params = sum(t.numel() for t in model.state_dict().values())
    return copies * 4 * params + MiB


def non_finite_options(values: Mapping[str, Any]) -> list[str]:
    """Names of the float options (single or lists) holding NaN or infinity."""
    bad = []
    for name, value in values.items():
        items: Iterable[Any] = value if isinstance(value, (list, tuple)) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in items):
            bad.append(name)
    return bad


def check_finite_options(values: Mapping[str, Any]) -> None:
    """Raise a ConfigError naming the first option that is NaN or infinite."""
    bad = non_finite_options(values)
    if bad:
        name = bad[0]
        raise ConfigError(f"--{name.replace('_', '-')} {values[name]} is not a finite number")


def check_image_sizes(paths: Sequence[str], stop: Optional[Callable[[], Optional[int]]] = None) -> None:
    """Read the header of every image (not its pixels) so that a decompression bomb, an image
    over Pillow's pixel limit, stops the run before the training rather than when the
    validation after the first epoch reaches it.

    Args:
        paths: image files.
        stop: called every few hundred files; a non-zero return (a signal number) raises
            :class:`utils.data.scan.ScanInterrupted`.

    Raises:
        DataError: naming the file over the limit.
    """
    from PIL import Image

    from ..data.scan import ScanInterrupted

    for i, path in enumerate(paths):
        if stop is not None and i % 256 == 0 and stop():
            raise ScanInterrupted(stop(), str(Path(path).parent))
        try:
            with Image.open(path):
                pass
        except Image.DecompressionBombError as e:
            raise DataError(f"cannot read image {path}: {e} (remove it, or raise PIL.Image.MAX_IMAGE_PIXELS if "
                            "it is genuine)") from None
        except (OSError, SyntaxError, ValueError):
            continue  # unreadable files follow the bad-image policy when they are loaded


class PreChecked(NamedTuple):
    """What the checks before a run found: the dataset's class names (None where only the
    loaded dataset knows them), and the --resume and the --initial-checkpoint / --finetune
    checkpoints, already read."""
    class_names: Optional[list[str]]
    resume_checkpoint: Optional[dict]
    start_checkpoint: Optional[dict] = None


def training_precision(args: argparse.Namespace, device: torch.device) -> Precision:
    """The autocast of --amp / --amp-dtype on ``device`` (:func:`utils.precision.resolve_precision`).

    Raises:
        ConfigError: a precision the device cannot run (float16 autocast on the CPU).
    """
    requested = args.amp_dtype or ("auto" if args.amp or args.native_amp else None)
    try:
        return resolve_precision(requested, device)
    except ValueError as e:
        flag = f"--amp-dtype {args.amp_dtype}" if args.amp_dtype else "--amp"
        raise ConfigError(f"{flag}: {e}") from None


def estimated_checkpoint_bytes(args: argparse.Namespace, num_classes: int) -> int:
    """Size of one training checkpoint of --model (weights, AdamW moments, EMA), from a model
    built on the meta device (no memory, no initialisation)."""
    with torch.device("meta"):
        model = create_dvt(args, num_classes)
    return checkpoint_bytes(model, copies=3 + int(args.model_ema))


def check_model_options(args: argparse.Namespace, num_classes: int) -> None:
    """--model can be built with the run's options (--model-kwargs, the reuse switches) and
    --eval-metric names one of its metrics: checked on the meta device (no memory)."""
    with torch.device("meta"):
        model = create_dvt(args, num_classes)
    check_eval_metric(args, model.num_exits)


def check_before_run(args: argparse.Namespace, folder: Path, device: Optional[torch.device] = None) -> PreChecked:
    """Everything that can be checked before the run writes anything or lists its images: the
    precision on ``device``, the class folders of train and val, the --resume or
    --initial-checkpoint / --finetune checkpoint, the output folder and its space."""
    if device is not None:
        training_precision(args, device)
    class_names = None
    tars = any(tar_split(args.data, split) is not None for split in (args.train_split, args.val_split))
    if args.dataset not in CIFAR_NUM_CLASSES and not tars:  # tar shards: checked once listed
        train_dir, val_dir = split_dir(args.data, args.train_split), split_dir(args.data, args.val_split)
        class_names = list_classes(train_dir)
        check_split_classes(class_names, list_classes(val_dir), args.data, args.train_split, args.val_split)
    known_classes = args.num_classes or (len(class_names) if class_names else CIFAR_NUM_CLASSES.get(args.dataset))
    num_classes = known_classes or 1000
    check_model_options(args, num_classes)
    checkpoint = start = None
    if args.initial_checkpoint or args.finetune:
        start = _checked_start(args, known_classes)
    if args.resume:
        checkpoint = _checked_resume(args, folder, class_names, num_classes)
        need = 2 * os.path.getsize(args.resume)
    else:
        need = 2 * estimated_checkpoint_bytes(args, num_classes)
    resumed_in_place = args.resume and not args.experiment  # the run folder is the checkpoint's
    label = f"the run folder {folder}" if resumed_in_place else f"--output {args.output}"
    check_output_folder(folder, need, label=label)
    return PreChecked(class_names, checkpoint, start)


def _checked_start(args: argparse.Namespace, num_classes: Optional[int]) -> dict:
    """The --initial-checkpoint or --finetune checkpoint, read, whose weights fit --model: with
    the run's classes for --initial-checkpoint (where they are known yet), with the file's own
    heads for --finetune (which replaces them)."""
    path = args.initial_checkpoint or args.finetune
    flag = "--initial-checkpoint" if args.initial_checkpoint else "--finetune"
    try:
        checkpoint = load_checkpoint_file(path)
        weights, _ = start_weights(args, checkpoint)
        classes = head_classes(weights) if args.finetune or num_classes is None else num_classes
        with torch.device("meta"):
            model = create_dvt(args, classes or num_classes or 1000)
        check_state_dict(model, weights)
    except CheckpointError as e:
        raise CheckpointError(f"{flag}: {e}") from None
    return checkpoint


def _checked_resume(args: argparse.Namespace, folder: Path, class_names: Optional[list[str]],
                    num_classes: int) -> dict:
    """The --resume checkpoint, read and checked: it fits --model, the image size and the
    classes, it is a training checkpoint, and resuming from it rewinds no later one."""
    checkpoint = load_checkpoint_file(args.resume)
    layout = None
    if checkpoint.get("model_name") not in (None, args.model):  # maybe a renamed variant of the same model
        with torch.device("meta"):
            layout = state_layout(create_dvt(args, num_classes).state_dict())
    check_resumable(checkpoint, args.resume, args.model, args.img_size, class_names, num_classes, layout)
    require_training_checkpoint(checkpoint, args.resume)
    check_not_rewinding(args.resume, folder, checkpoint, LAST)
    return checkpoint

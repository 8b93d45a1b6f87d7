"""Checks made before a run writes anything or starts long work.

Each raises the error type whose one ``error: ...`` line the command-line tools print, naming
the file at fault and what to do. None of them changes anything on disk.
"""
from __future__ import annotations

import math
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch

from .errors import CheckpointError, ConfigError, DataError

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


def unreadable_checkpoint_reason(path: str | os.PathLike) -> Optional[str]:
    """Why a file cannot be a PyTorch checkpoint, judged from its first bytes (None when it
    looks like one: a zip archive or a pickle)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        return e.strerror or str(e)
    if size == 0:
        return "it is empty (0 bytes): it was not written to the end"
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):
            return f"it is a damaged PyTorch file ({size:,} bytes, cut short?)"
        return None
    if head[:1] == b"\x80":
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"it is not a PyTorch checkpoint (it starts with the bytes {head[:8]!r})"
    first = text.strip().splitlines()[0][:40] if text.strip() else ""
    return f"it is a text file, not a PyTorch checkpoint (it starts with {first!r})"


def check_image_sizes(paths: Sequence[str], stop: Optional[Callable[[], Optional[int]]] = None) -> None:
    """Read the header of every image (not its pixels) so that a decompression bomb, an image
    over Pillow's pixel limit, stops the run before the training rather than when the
    validation after the first epoch reaches it.

    Args:
        paths: image files.
        stop: called every few hundred files; a non-zero return (a signal number) raises
            :class:`utils.scan.ScanInterrupted`.

    Raises:
        DataError: naming the file over the limit.
    """
    from PIL import Image

    from .scan import ScanInterrupted

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


def state_layout(state_dict: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a state dict (tensors only)."""
    return {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}


def check_resumable(checkpoint: Mapping[str, Any], path: str, model: str, img_size: int,
                    class_names: Optional[Sequence[str]], num_classes: Optional[int],
                    layout: Optional[Mapping[str, tuple[int, ...]]] = None) -> None:
    """A training checkpoint fits the run about to resume from it.

    Args:
        checkpoint: the loaded file.
        path: its path, for the messages.
        model: ``--model`` of the run.
        img_size: ``--img-size`` of the run.
        class_names: the dataset's classes (None when unknown, e.g. before CIFAR is read).
        num_classes: the run's number of classes (None when unknown).
        layout: key -> shape of --model's weights; a checkpoint stored under another model
            name is accepted when its weights have exactly this layout (a renamed variant).

    Raises:
        ConfigError: a released file, or another model, image size or set of classes.
    """
    if "model_state_dict" in checkpoint and "format" not in checkpoint:
        raise ConfigError(f"--resume {path} is a released checkpoint (weights and results only, no training "
                          "state); continue training from its weights with --initial-checkpoint or --finetune")
    stored = checkpoint.get("model_name")
    weights = checkpoint.get("model")
    same_layout = layout is not None and isinstance(weights, Mapping) and state_layout(weights) == dict(layout)
    if stored and stored != model and not same_layout:
        raise ConfigError(f"--resume {path} is a {stored} checkpoint, but --model is {model}; pass --model {stored}")
    kwargs = checkpoint.get("model_kwargs") or {}
    if kwargs.get("img_size") not in (None, img_size):
        raise ConfigError(f"--resume {path} was trained at --img-size {kwargs['img_size']}, this run is at "
                          f"{img_size}; pass --img-size {kwargs['img_size']}")
    stored_names = checkpoint.get("class_names")
    if class_names is not None and stored_names is not None and list(stored_names) != list(class_names):
        from .classes import compare_classes

        diff = compare_classes(stored_names, class_names, "the checkpoint", "the dataset")
        raise ConfigError(f"--resume {path}: the dataset's classes are not those of the checkpoint ({diff}); "
                          "resume on the dataset it was trained on")
    stored_count = kwargs.get("num_classes")
    if num_classes is not None and stored_count is not None and stored_count != num_classes:
        raise ConfigError(f"--resume {path} has {stored_count} classes, this run {num_classes}; resume on the "
                          "dataset it was trained on (or start a new run with --finetune)")


def check_not_rewinding(resume: str | os.PathLike, folder: str | os.PathLike, resumed: Mapping[str, Any],
                        last_name: str = "last.pth.tar") -> None:
    """Resuming from an older checkpoint (say best.pth.tar) into a folder whose last
    checkpoint is further on would overwrite that one with an earlier state: refuse.

    Raises:
        ConfigError: the folder's last checkpoint is ahead of ``resume``.
    """
    last = Path(folder) / last_name
    if not last.is_file() or last.resolve() == Path(resume).resolve():
        return
    from .checkpoint import load_checkpoint_file

    try:
        ahead = load_checkpoint_file(last)
    except CheckpointError:
        return  # a damaged last checkpoint is no state worth keeping
    here, there = int(resumed.get("num_updates", 0)), int(ahead.get("num_updates", 0))
    if there > here:
        raise ConfigError(
            f"--resume {resume} (epoch {resumed.get('epoch')}, {here} updates) is behind {last} (epoch "
            f"{ahead.get('epoch')}, {there} updates) of the same run, which resuming would overwrite; resume "
            f"from {last}, or pass --experiment NAME to continue from {Path(resume).name} in a new folder")

"""Checkpoint files: reading one safely (``weights_only=True``, a clear error for anything
that is not a checkpoint) and writing or copying one atomically and durably; any other file
the project writes whole (results, plots, folder descriptions) atomically too.

Loading never unpickles arbitrary objects: only numpy scalars, arrays and dtypes and
``argparse.Namespace`` are allowed beyond tensors and plain containers (the released files
may hold numpy numbers in their result lists; the original training checkpoints keep
their options as a Namespace)."""
from __future__ import annotations

import argparse
import os
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from models.pretrained import numpy_safe_globals

from ..errors import CheckpointError, CheckpointWriteError
from .model_folder import CONFIG_FILE, WEIGHTS_FILE, is_model_folder, read_model_folder


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


def _safe_globals() -> list:
    """numpy values, and the options Namespace of the original training checkpoints (a
    Namespace only takes attributes: loading one runs no code)."""
    return numpy_safe_globals() + [argparse.Namespace]


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Read a checkpoint with ``weights_only=True``, or a model folder (``config.json`` +
    ``model.safetensors``: :func:`utils.checkpoint.model_folder.read_model_folder`).

    Raises:
        CheckpointError: the file is missing, not a checkpoint, or holds pickled objects
            other than tensors, numbers, strings, containers and numpy values.
    """
    path = Path(path)
    if is_model_folder(path):
        return read_model_folder(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file or a model folder ({CONFIG_FILE} + "
                              f"{WEIGHTS_FILE}); pass a file in it (e.g. {path / 'last.pth.tar'})")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    reason = unreadable_checkpoint_reason(path)
    if reason:
        raise CheckpointError(f"cannot read checkpoint {path}: {reason}; pass another checkpoint (a run folder "
                              "keeps last.pth.tar and best.pth.tar)")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        unsafe = [line.strip() for line in first if "GLOBAL" in line or "Unsupported" in line]
        raise CheckpointError(
            f"refusing to load {path}: it is not a safe checkpoint (it holds pickled Python objects "
            f"that could run code when loaded). {' '.join(unsafe)[:300]}".rstrip()) from None
    except Exception as e:  # torch.load reports a damaged file through many exception types
        detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path} (not a PyTorch checkpoint, or damaged): "
                              f"{detail}") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dictionary")
    return dict(obj)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: a reader (or a
    crash) never sees a half-written checkpoint."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise CheckpointWriteError(path, e) from None
    try:
        os.fchmod(fd, default_file_mode())  # mkstemp makes 0600 files; a checkpoint is shared like any other
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        cause = os_error_in(e)
        if cause is not None:  # torch.save reports a failed write as a RuntimeError ("unexpected pos")
            raise CheckpointWriteError(path, cause) from None
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` into a fresh temporary file beside ``path`` (unique to this call, so two
    runs writing one path never share it), then renamed over ``path``: a reader, a crash or a
    full disk never leaves half a file there. The temporary file is removed when ``write``
    fails; the file gets the permissions the umask gives. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            os.fchmod(fd, default_file_mode())  # mkstemp makes 0600 files
        finally:
            os.close(fd)
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def default_file_mode() -> int:
    """The permissions a new file gets from the umask (``mkstemp`` alone makes 0600 files)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def os_error_in(error: Optional[BaseException]) -> Optional[OSError]:
    """The OSError behind ``error`` (itself, or in its chain of causes), if any: ``torch.save``
    reports a failed write as a RuntimeError ("unexpected pos") raised while handling it."""
    for _ in range(10):
        if error is None:
            return None
        if isinstance(error, OSError) and error.errno is not None:
            return error
        error = error.__cause__ or error.__context__
    return None


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the platform allows opening folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike, link: bool = True) -> None:
    """Make ``dst`` a copy of the finished file ``src`` without serialising it again: a hard
    link when the file system allows it (instant, no extra space), else a byte copy; written
    under a temporary name, fsync'd, then renamed, so ``dst`` is always a whole file.

    A hard link is safe because checkpoints are never rewritten in place: the next
    :func:`atomic_save` of ``src`` renames a new file over it and leaves ``dst`` as it was.

    Args:
        src: the checkpoint just written.
        dst: the copy (``best.pth.tar``).
        link: try a hard link first.
    """
    src, dst = Path(src), Path(dst)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        os.unlink(tmp)
        try:
            if not link:
                raise OSError("byte copy asked for")
            os.link(src, tmp)
        except OSError:
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, 16 << 20)
                fout.flush()
                os.fsync(fout.fileno())
            shutil.copymode(src, tmp)
        os.replace(tmp, dst)
        _fsync_folder(dst.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise

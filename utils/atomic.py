"""Copying a finished file into place atomically and durably (the best checkpoint's copy)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional


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

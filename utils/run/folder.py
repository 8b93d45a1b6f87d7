"""Run folders: one training run per folder at a time (a lock file naming its holder), and
unique names for timestamped folders, so a folder is never shared by accident."""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Optional

RUN_LOCK = ".run.lock"


class RunLockedError(RuntimeError):
    """Another process holds the run folder's lock."""


class RunLock:
    """Exclusive lock of a run folder (the folder must exist).

    Usage::

        with RunLock(folder):
            ...  # write checkpoints, logs and summaries of the run

    Args:
        folder: the run folder.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / RUN_LOCK
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        """Take the lock at once or raise :class:`RunLockedError` naming the holder."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunLockedError(
                f"{self.path.parent} is in use by another run ({describe_holder(self.path)}); wait for it to "
                f"end or choose another --experiment (the lock is {self.path}; it is released when that "
                "process ends, even if it is killed)") from None
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        os.ftruncate(fd, 0)
        os.write(fd, f"host {socket.gethostname()}\npid {os.getpid()}\nstarted {started}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (closing the file releases the flock)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def describe_holder(path: str | os.PathLike) -> str:
    """``host H, pid P, started T`` from a lock file, as far as it can be read."""
    fields: dict[str, str] = {}
    for _ in range(20):  # the holder writes its line right after locking: wait a moment for it
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            text = ""
        fields = dict(line.split(" ", 1) for line in text.splitlines() if " " in line)
        if {"host", "pid", "started"} <= fields.keys():
            break
        time.sleep(0.05)
    if not fields:
        return "holder unknown"
    return ", ".join(f"{k} {fields[k]}" for k in ("host", "pid", "started") if k in fields)


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

"""One training run per run folder at a time.

An exclusive ``fcntl.flock`` on ``RUN_LOCK`` inside the run folder, held for the whole run.
The kernel drops the lock when the holding process ends, however it ends (``kill -9``, a
crash, a preempted node), so a stale lock never blocks a resume. The file holds who has the
lock (host, pid, start time) so a refused run can name the holder. The file itself stays
when the run ends: removing it would let a waiting process lock a file that is no longer the
one in the folder.
"""
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

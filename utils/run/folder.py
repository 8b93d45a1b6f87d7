"""Run folders: where a training run writes (``OUTPUT/train/EXPERIMENT``, the resumed
checkpoint's folder, or one named after the run's settings under torchrun), the files it
writes there, one run per folder at a time (a lock file naming its holder), and unique names
for timestamped folders, so a folder is never shared by accident."""
from __future__ import annotations

import argparse
import errno
import fcntl
import os
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

from ..errors import ConfigError
from .config import resolved_config
from .distributed import DistEnv, broadcast_object, derived_experiment, under_elastic_launcher

RUN_LOCK = ".run.lock"
CONFIG_FILE = "config.yaml"
LAST, BEST, RELEASED = "last.pth.tar", "best.pth.tar", "released.pth.tar"


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


def run_exists_message(folder: Path) -> str:
    """Why a new run cannot start in ``folder``, which holds one."""
    return (f"{folder} already holds a run ({LAST}); resume it with --resume {folder / LAST} or --auto-resume, "
            "or choose another --experiment")


def run_folder(args: argparse.Namespace, env: DistEnv) -> Path:
    """OUTPUT/train/EXPERIMENT, or the resumed checkpoint's folder, or under torchrun one named
    after the run's settings (found again by restarts and re-launches), else a timestamped one;
    the same on every rank. Under torchrun an existing run there is resumed (--auto-resume)."""
    derived = derived_experiment(resolved_config(args), args.model, args.img_size)
    if args.experiment:
        folder = Path(args.output) / "train" / args.experiment
    elif args.resume:
        folder = Path(args.resume).resolve().parent
    elif derived:
        folder = Path(args.output) / "train" / derived
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        folder = Path(args.output) / "train" / f"{stamp}-{args.model}-{args.img_size}"
    folder = Path(broadcast_object(str(folder)))
    auto_resume = under_elastic_launcher() if args.auto_resume is None else args.auto_resume
    if auto_resume and not args.resume and (folder / LAST).is_file():
        args.resume = str(folder / LAST)
    if not args.resume and (folder / LAST).is_file():
        raise ConfigError(run_exists_message(folder))
    return folder


def claim_run_folder(args: argparse.Namespace, env: DistEnv, folder: Path) -> tuple[Path, Optional[RunLock]]:
    """Create the run folder (timestamped ones under a name no other run has) and lock it for
    this run (rank 0); every rank gets the folder, or the same ConfigError."""
    lock, message = None, None
    if env.is_main:
        try:
            if args.experiment or args.resume or under_elastic_launcher():  # a name to find again
                folder.mkdir(parents=True, exist_ok=True)
            else:
                folder = create_unique_folder(folder.parent, folder.name)
            lock = RunLock(folder).acquire()
            if not args.resume and (folder / LAST).is_file():  # written since the first look
                lock.release()
                message = run_exists_message(folder)
        except RunLockedError as e:
            message = str(e)
        except OSError as e:
            message = f"cannot create the run folder {folder}: {e.strerror or e}; pass another --output"
    name, message = broadcast_object((str(folder), message))
    if message:
        raise ConfigError(message)
    return Path(name), lock

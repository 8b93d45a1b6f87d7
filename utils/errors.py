"""The error types behind the one-line ``error: ...`` messages of the command-line tools."""
from __future__ import annotations

import sys
from typing import Any, Callable


class ConfigError(ValueError):
    """A configuration that cannot work: unknown key, bad value, options that do not fit together."""


class DataError(RuntimeError):
    """A dataset that cannot be used: missing folders, no images, unreadable files."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, unsafe, or not for this model."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, read-only, ...); the file it would
    have replaced is unchanged."""

    def __init__(self, path: object, cause: OSError) -> None:
        name = getattr(path, "name", str(path))
        super().__init__(f"cannot write {path}: {cause.strerror or cause} (errno {cause.errno}); the previous {name}, "
                         "if any, is left as it was: make room or fix the folder, then run again (a training run: "
                         "--resume its last.pth.tar)")
        self.errno = cause.errno


def one_line(error: BaseException) -> str:
    """The meaningful line of an error, as the commands print it after ``error:``. Errors raised
    in DataLoader workers come back with the worker's whole traceback in the message; keep its
    last line, without the exception's type name."""
    text = str(error).strip()
    if "Traceback (most recent call last)" in text:
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        head, sep, rest = last.partition(": ")
        text = rest if sep and " " not in head else last
    lines = text.splitlines()
    return lines[0] if lines else type(error).__name__


def run_command(body: Callable[[], Any]) -> int:
    """A script's body run as a command: 0 when done; an expected error ends it with one
    ``error: ...`` line on stderr and status 2 (bad options) or 1 (data or checkpoint)."""
    try:
        body()
    except ConfigError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except (CheckpointError, DataError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    return 0

"""The error types behind the one-line ``error: ...`` messages of the command-line tools."""
from __future__ import annotations


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

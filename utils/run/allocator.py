"""The C allocator's settings for the commands' CPU work.

glibc's malloc gives blocks above a threshold (at most 32 MiB by default) their own memory from
the operating system and hands it back when they are freed, so a model whose activations are
larger (DeiT-S at batch 64: 64 x 197 x 1,536 float32 values, 74 MiB, per MLP layer) page-faults
fresh memory in on every call. :func:`keep_freed_memory` makes such blocks come from the heap
and keeps up to 1 GiB of freed heap for reuse: what
``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=268435456:glibc.malloc.trim_threshold=1073741824``
does, set from inside the process (timm's DeiT-S at batch 64 in float32 on 2 cores: 21.9 ->
27.1 images/s; see docs/benchmarks.md).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

from utils.errors import ConfigError

MMAP_THRESHOLD = 256 << 20  # blocks up to this size come from the heap
TRIM_THRESHOLD = 1 << 30  # freed heap kept up to this size
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
OPT_OUT = "DVT_MALLOC"  # DVT_MALLOC=default leaves the allocator as it is
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")


def allocator_choice() -> str:
    """Why :func:`keep_freed_memory` would or would not change the allocator: ``keep`` (it
    would), or the reason it leaves it (not glibc, the opt-out, the user's own settings).
    Raises :class:`ConfigError` when ``DVT_MALLOC`` holds anything but ``default`` (a typo
    would otherwise keep the settings it meant to turn off)."""
    value = os.environ.get(OPT_OUT, "").strip()
    if value and value.lower() != "default":
        raise ConfigError(f"{OPT_OUT}={value!r} is not understood: set {OPT_OUT}=default to leave the C allocator "
                          f"as it is, or unset it")
    if not _glibc():
        return "not glibc"
    if value:
        return f"{OPT_OUT}=default"
    if "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets malloc"
    given = [k for k in _USER_SETTINGS if os.environ.get(k)]
    return f"{given[0]} set" if given else "keep"


def _glibc() -> bool:
    try:
        return sys.platform.startswith("linux") and (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):
        return False


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (:data:`MMAP_THRESHOLD`, :data:`TRIM_THRESHOLD`) for
    this process and the processes it forks, unless :func:`allocator_choice` says to leave them;
    returns whether they were set. Only the speed of large CPU tensors changes."""
    if allocator_choice() != "keep":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False

"""The ``--amp`` rule shared by main.py and inference.py: which autocast dtype to use.

- CUDA (and other accelerators): float16 (training adds a gradient scaler), unless bfloat16 is
  asked for. float16 is fast on every GPU; bfloat16 only from compute capability 8.0 (Ampere)
  on, so asking for it on an older GPU gives a warning.
- CPU: bfloat16 where the CPU computes it natively (AVX512-BF16 or AMX on x86, the BF16
  extension on Arm). Elsewhere bfloat16 is emulated and its matrix products run about 100x
  slower than float32 (1.3 against 181 GFLOP/s measured on an AVX2 machine), so a bare
  ``--amp`` runs in float32 with a warning, and an explicit bfloat16 request runs with a
  warning naming that cost. float16 autocast needs CUDA.
"""
from __future__ import annotations

import contextlib
import platform
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

BF16_NAMES = ("bf16", "bfloat16")
FP16_NAMES = ("fp16", "float16")
AUTO = "auto"  # a bare --amp
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX512-BF16, x86 AMX, Arm BF16
EMULATED_BF16_COST = "about 100x slower than float32"


@dataclass(frozen=True)
class Precision:
    """dtype: the autocast dtype, or None for float32; needs_scaler: float16 training needs a
    gradient scaler; warning: a message for the user, or None."""
    dtype: Optional[torch.dtype]
    needs_scaler: bool = False
    warning: Optional[str] = None


def flags_have_native_bf16(cpuinfo: str) -> bool:
    """Whether the ``flags`` / ``Features`` lines of a /proc/cpuinfo text name native bf16."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features") and set(value.split()) & set(NATIVE_BF16_FLAGS):
            return True
    return False


def _bf16_matmul_is_fast(size: int = 256, repeats: int = 3) -> bool:
    """Timed probe where /proc/cpuinfo is missing: bf16 matmul at most 1.5x float32's time."""
    def best(dtype: torch.dtype) -> float:
        a = torch.ones(size, size, dtype=dtype)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ a
            times.append(time.perf_counter() - start)
        return min(times)
    return best(torch.bfloat16) <= 1.5 * best(torch.float32)


@lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively: from /proc/cpuinfo where there is one,
    else from a timed probe of a small matrix product. An x86 CPU whose kernels are capped at
    AVX2 (``ATEN_CPU_CAPABILITY=avx2``, as on an AVX2-only CPU) runs bfloat16 emulated, whatever
    its flags say."""
    if _capped_below_avx512():
        return False
    try:
        return flags_have_native_bf16(Path("/proc/cpuinfo").read_text())
    except OSError:
        return _bf16_matmul_is_fast()


def _capped_below_avx512() -> bool:
    """x86 with torch's CPU kernels at AVX2 or below (by the CPU or by ATEN_CPU_CAPABILITY)."""
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
    return x86 and torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX", "AVX2", "NO AVX")


def cpu_description() -> str:
    """The CPU's model name and torch's CPU capability, e.g. 'AMD EPYC (AVX512)'."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.backends.cpu.get_cpu_capability()})"


def resolve_precision(requested: Optional[str], device: torch.device) -> Precision:
    """The autocast dtype for ``--amp`` on ``device``.

    Args:
        requested: None (no autocast: float32), ``"auto"`` (a bare ``--amp``), or a dtype name
            (``bf16``/``bfloat16``, ``fp16``/``float16``).
        device: where the model runs.

    Raises:
        ValueError: an unknown name, or float16 on the CPU.
    """
    if requested is None:
        return Precision(None)
    if requested not in (AUTO, *BF16_NAMES, *FP16_NAMES):
        raise ValueError(f"unknown autocast dtype {requested!r}: use bf16 or fp16")
    if device.type == "cpu":
        if requested in FP16_NAMES:
            raise ValueError("float16 needs CUDA; on the CPU use bfloat16 (or no autocast)")
        if cpu_has_native_bf16():
            return Precision(torch.bfloat16)
        cpu = cpu_description()
        if requested == AUTO:
            return Precision(None, warning=(
                f"--amp: this CPU, {cpu}, has no native bfloat16 (AVX512-BF16/AMX), where bfloat16 "
                f"autocast runs {EMULATED_BF16_COST}; running in float32 instead (ask for bf16 "
                f"explicitly to use it anyway)"))
        return Precision(torch.bfloat16, warning=(
            f"bfloat16 autocast on {cpu}, which has no native bfloat16 (AVX512-BF16/AMX): matrix "
            f"products run {EMULATED_BF16_COST}"))
    if requested in BF16_NAMES:
        warning = None
        if device.type == "cuda" and torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(device)
            if major < 8:
                warning = (f"bfloat16 autocast on a GPU of compute capability {major}.{minor}: native "
                           f"bfloat16 needs 8.0 (Ampere) or newer, so it is emulated and slower than float16")
        return Precision(torch.bfloat16, warning=warning)
    return Precision(torch.float16, needs_scaler=True)


def autocast_context(device: torch.device, amp_dtype: Optional[torch.dtype]):
    """``torch.autocast`` for the device, or nothing when ``amp_dtype`` is None."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=amp_dtype)

"""The --amp rule: float16 on CUDA unless bfloat16 is asked for; bfloat16 on a CPU only where
it is native, else float32 (bare --amp) or bfloat16 with a warning naming the cost."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from utils import precision
from utils.precision import AUTO, Precision, flags_have_native_bf16, resolve_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")

AVX2_CPUINFO = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx avx2 fma\n"
AVX512_CPUINFO = "processor\t: 0\nflags\t\t: avx2 avx512f avx512bw avx512vl\n"
BF16_CPUINFO = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16\n"
AMX_CPUINFO = "flags\t\t: avx2 avx512f amx_bf16 amx_tile\n"
ARM_CPUINFO = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"


@pytest.mark.parametrize("text, native", [(AVX2_CPUINFO, False), (AVX512_CPUINFO, False), (BF16_CPUINFO, True),
                                          (AMX_CPUINFO, True), (ARM_CPUINFO, True), ("", False)])
def test_cpuinfo_flags(text, native):
    assert flags_have_native_bf16(text) is native


@pytest.fixture
def cpu_bf16(monkeypatch):
    def set_native(native: bool) -> None:
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    return set_native


def test_no_amp_is_float32():
    assert resolve_precision(None, CPU) == Precision(None)
    assert resolve_precision(None, CUDA) == Precision(None)


def test_cuda_defaults_to_float16_with_scaler():
    assert resolve_precision(AUTO, CUDA) == Precision(torch.float16, needs_scaler=True)
    for name in ("fp16", "float16"):
        assert resolve_precision(name, CUDA) == Precision(torch.float16, needs_scaler=True)
    if not torch.cuda.is_available():  # on a GPU the answer may carry a capability warning
        for name in ("bf16", "bfloat16"):
            assert resolve_precision(name, CUDA) == Precision(torch.bfloat16)


def test_cpu_with_native_bf16(cpu_bf16):
    cpu_bf16(True)
    for name in (AUTO, "bf16", "bfloat16"):
        assert resolve_precision(name, CPU) == Precision(torch.bfloat16)


def test_cpu_without_native_bf16_warns_and_bare_amp_stays_float32(cpu_bf16):
    cpu_bf16(False)
    bare = resolve_precision(AUTO, CPU)
    assert bare.dtype is None and not bare.needs_scaler
    assert "100x slower" in bare.warning and "float32" in bare.warning
    asked = resolve_precision("bf16", CPU)
    assert asked.dtype == torch.bfloat16 and "100x slower" in asked.warning


@pytest.mark.parametrize("name", ["fp16", "float16"])
def test_float16_on_cpu_is_refused(name):
    with pytest.raises(ValueError, match="float16 needs CUDA"):
        resolve_precision(name, CPU)


def test_unknown_name_is_refused():
    with pytest.raises(ValueError, match="unknown autocast dtype"):
        resolve_precision("int8", CPU)


def test_this_cpu_is_described():
    text = precision.cpu_description()
    assert torch.backends.cpu.get_cpu_capability() in text


@pytest.mark.parametrize("fast", [True, False])
def test_probe_answers_without_cpuinfo(fast, monkeypatch):
    """Where /proc/cpuinfo is missing, the timed probe decides."""
    monkeypatch.setattr(precision.Path, "read_text", lambda self: (_ for _ in ()).throw(OSError("no such file")))
    monkeypatch.setattr(precision, "_bf16_matmul_is_fast", lambda: fast)
    monkeypatch.setattr(precision, "_capped_below_avx512", lambda: False)
    precision.cpu_has_native_bf16.cache_clear()
    try:
        assert precision.cpu_has_native_bf16() is fast
    finally:
        precision.cpu_has_native_bf16.cache_clear()


@pytest.mark.parametrize("machine, capability, capped", [
    ("x86_64", "AVX2", True), ("x86_64", "DEFAULT", True), ("x86_64", "AVX512", False),
    ("aarch64", "DEFAULT", False), ("aarch64", "SVE256", False)])
def test_kernels_capped_at_avx2_run_bf16_emulated(machine, capability, capped, monkeypatch):
    """ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU runs the code an AVX2-only CPU runs: bf16 is
    then emulated whatever /proc/cpuinfo says, and a bare --amp runs float32."""
    monkeypatch.setattr(precision.platform, "machine", lambda: machine)
    monkeypatch.setattr(precision.torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(precision.Path, "read_text", lambda self: "flags\t: fpu avx2 avx512f avx512_bf16 amx_bf16\n")
    precision.cpu_has_native_bf16.cache_clear()
    try:
        assert precision._capped_below_avx512() is capped
        assert precision.cpu_has_native_bf16() is (not capped)
        assert resolve_precision(AUTO, CPU).dtype == (None if capped else torch.bfloat16)
    finally:
        precision.cpu_has_native_bf16.cache_clear()


@pytest.mark.parametrize("bf16_s, fp32_s, fast", [(1.2, 1.0, True), (1.5, 1.0, True), (2.0, 1.0, False),
                                                  (100.0, 1.0, False)])
def test_probe_compares_bf16_with_float32(bf16_s, fp32_s, fast, monkeypatch):
    """bfloat16 counts as native when its matrix product takes at most 1.5x float32's time (the
    best of the repeats: one slow outlier does not decide)."""
    durations = [bf16_s * 3, bf16_s, bf16_s * 2, fp32_s * 5, fp32_s, fp32_s]  # bf16 repeats, then float32's
    clock = iter([t for d in durations for t in (0.0, d)])
    monkeypatch.setattr(precision, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    assert precision._bf16_matmul_is_fast(size=4, repeats=3) is fast


def test_main_and_inference_share_the_rule(cpu_bf16, capsys, caplog):
    """Bare --amp on a CPU without native bf16: float32 and a warning, in both tools."""
    import argparse
    import logging

    import inference
    import main as train_main

    cpu_bf16(False)
    assert inference.resolve_amp("auto", CPU) is None
    assert "100x slower" in capsys.readouterr().err
    args = argparse.Namespace(amp=True, native_amp=False, amp_dtype=None)
    logger = logging.getLogger("dvt.train")
    logger.addHandler(caplog.handler)  # main.py's logger may not propagate to the root logger
    try:
        assert train_main.amp_settings(args, CPU) == (None, False)
    finally:
        logger.removeHandler(caplog.handler)
    assert "100x slower" in caplog.text
    assert train_main.amp_settings(argparse.Namespace(amp=True, native_amp=False, amp_dtype=None), CUDA) == (
        torch.float16, True)
    cpu_bf16(True)
    assert inference.resolve_amp("auto", CPU) == torch.bfloat16
    assert train_main.amp_settings(args, CPU) == (torch.bfloat16, False)

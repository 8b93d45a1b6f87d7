"""The parts of the GPU report that ``scripts/gpu_check.sh`` assembles, each as markdown.

    python scripts/bench_gpu.py machine --out machine.md        # GPU, driver, versions, CPU
    python scripts/bench_gpu.py tests --junit cuda.xml --log pytest.log --collected ids.txt --out tests.md
    python scripts/bench_gpu.py bench --out bench.md [--budget-s 240] [--original PATH]
    python scripts/bench_gpu.py bench --dry-run --out bench.md  # CPU, DVT_tiny, tiny batches

``bench`` sections, each written to ``--out`` as soon as it is done:

* matrix-product ceilings of each dtype (``benchmark.matmul_peak``);
* all exits: images/second of ours in float32 and under bfloat16 and float16 autocast, of the
  original implementation (in a child process, with ``--original``) and of timm's static
  ``deit_small_patch16_224``, at batch 64 and 256;
* real early exit at the exit shares of budget row 10 (where the paper's cascade matches its
  static model's accuracy) against the static model (``benchmark.early_exit_vs_static``:
  weights converted with ``model.to(dtype)``);
* training: forward, summed loss, backward and AdamW step (``bench_train.train_steps``) with
  autocast (float16 with a gradient scaler, bfloat16), images/second per GPU and peak memory;
* ``torch.compile`` against eager, all exits, for the cases the time allows (first listed first).

GPU times come from CUDA events around each call (median of the timed calls, after warm-up
calls); on the CPU from the wall clock. Every section has a share of ``--budget-s``, unused time
passes on to the next ones, and a row whose time has run out is reported as "skipped (time)"; on
SIGTERM (``timeout``) the section in progress is written with the rows it has.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import timm  # noqa: E402

import models  # noqa: E402,F401  (registers the DVT models)
from benchmark import OriginalWorker, build, cpu_flags, early_exit_vs_static, machine_description, matmul_peak, \
    model_gmacs  # noqa: E402
from benchmark import DEFAULT_POOL, parse_args as benchmark_args  # noqa: E402
from bench_train import train_steps  # noqa: E402
from models.deploy import compile_model  # noqa: E402
from utils.budget.flops import exit_gflops  # noqa: E402
from utils.precision import autocast_context, cpu_description  # noqa: E402

AMP = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Plan:
    """What ``bench`` measures. Compile cases are (model, precision), in order of priority."""
    models: list[str]
    baseline: str
    img_size: int
    batches: list[int]
    precisions: list[str]
    warmup: int
    iters: int
    early_models: list[str]
    early_dtypes: list[str]
    train_models: list[str]
    train_precisions: list[str]
    train_batch: int
    compile_cases: list[tuple[str, str]]
    compile_backend: str = "inductor"
    compile_min_s: float = 45.0  # no compilation starts with less time than this left
    budget_index: int = 10
    pool: int = DEFAULT_POOL  # images per batch size of the early-exit rows (benchmark.py --pool)
    not_here: list[str] = field(default_factory=list)  # what this plan leaves to a GPU


def gpu_plan() -> Plan:
    return Plan(
        models=["DVT_T2t_vit_12", "DVT_T2t_vit_14", "DVT_Deit_small"], baseline="deit_small_patch16_224",
        img_size=224, batches=[64, 256], precisions=["fp32", "bf16", "fp16"], warmup=2, iters=8,
        early_models=["DVT_T2t_vit_12", "DVT_Deit_small"], early_dtypes=["fp16", "bf16"],
        train_models=["DVT_T2t_vit_12", "DVT_Deit_small"], train_precisions=["fp16", "bf16"], train_batch=64,
        compile_cases=[("DVT_T2t_vit_12", "bf16"), ("deit_small_patch16_224", "bf16"), ("DVT_Deit_small", "bf16"),
                       ("DVT_T2t_vit_12", "fp16"), ("DVT_T2t_vit_14", "bf16"), ("DVT_T2t_vit_12", "fp32")])


def dry_plan() -> Plan:
    """Every section on the CPU in seconds: DVT_tiny at 32 px, batches of 2 and 4, float32 and
    bfloat16 (float16 autocast needs CUDA), early exit on pools of 28 images, compilation with a
    light backend."""
    return Plan(
        models=["DVT_tiny"], baseline="deit_tiny_patch16_224", img_size=32, batches=[2, 4], precisions=["fp32", "bf16"],
        warmup=1, iters=2, early_models=["DVT_tiny"], early_dtypes=["fp32"], train_models=["DVT_tiny"],
        train_precisions=["fp32", "bf16"], train_batch=4, compile_cases=[("DVT_tiny", "fp32")],
        compile_backend="aot_eager", compile_min_s=5.0, pool=28,
        not_here=["the released models at 224 px, batches 64 and 256", "float16 autocast",
                  "CUDA-event timing and peak GPU memory", "the original implementation on the GPU"])


# ------------------------------------------------------------------------------- timing

class TimeUp(BaseException):
    """The step's time limit (SIGTERM from ``timeout``) arrived. Not an ``Exception``: handlers of
    errors in the libraries must not swallow it."""


def _raise_time_up(signum, frame) -> None:
    raise TimeUp()


def seconds_per_call(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds of ``fn()`` after ``warmup`` calls: CUDA events on a GPU, else the wall clock."""
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        for _ in range(iters):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
    return statistics.median(times)


class Clock:
    """Deadlines for the sections: each gets its share of what is left when it starts."""

    def __init__(self, budget_s: float, shares: dict[str, float]) -> None:
        self.end = time.monotonic() + budget_s
        self.shares = dict(shares)
        self.deadline = self.end

    def start(self, section: str) -> None:
        left = max(0.0, self.end - time.monotonic())
        share = self.shares.pop(section)
        self.deadline = time.monotonic() + left * share / (share + sum(self.shares.values()))

    def left(self) -> float:
        return self.deadline - time.monotonic()


# ---------------------------------------------------------------- original implementation

_ORIGINAL_WORKER = r'''
import collections.abc, contextlib, statistics, sys, time, types
import torch
six = types.ModuleType("torch._six")  # removed from torch; the vendored timm of the original imports it
six.container_abcs, six.string_classes, six.int_classes, six.inf = collections.abc, (str, bytes), int, float("inf")
sys.modules["torch._six"] = six
root, device, size = sys.argv[1], torch.device(sys.argv[2]), int(sys.argv[3])
if device.type != "cuda":
    torch.Tensor.cuda = lambda self, *a, **k: self  # the original moves tensors with .cuda() inside forward
sys.path.insert(0, root)
import models, models_deit  # noqa: registers the original DVT models in the vendored timm
from timm.models import create_model
AMP = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
built, images = {}, {}

def once(model, x):
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(); model(x); end.record(); end.synchronize()
        return start.elapsed_time(end) / 1e3
    t = time.perf_counter(); model(x)
    return time.perf_counter() - t

print("seconds ready", flush=True)
for line in sys.stdin:
    name, precision, batch, warmup, iters = line.split()
    try:
        if name not in built:
            torch.manual_seed(0)
            built[name] = create_model(name).eval().to(device)
        if batch not in images:
            images[batch] = torch.randn(int(batch), 3, size, size, device=device)
        amp = AMP[precision]
        ctx = torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            times = [once(built[name], images[batch]) for _ in range(int(warmup) + int(iters))][int(warmup):]
        print("seconds", statistics.median(times), flush=True)
    except Exception as e:
        print("seconds error", type(e).__name__, (str(e).splitlines() or [""])[0][:200], flush=True)
'''


class OriginalOnDevice(OriginalWorker):
    """The original implementation in a child process (its vendored timm would shadow ours),
    on ``device``, under autocast too; ``time(name, precision, batch)`` returns its median
    seconds per call, or the error it met."""

    def __init__(self, root: Path, device: torch.device, img_size: int, warmup: int, iters: int) -> None:
        self.warmup, self.iters = warmup, iters
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _ORIGINAL_WORKER, str(root), str(device), str(img_size)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=str(root))
        if self._answer() != "ready":
            raise RuntimeError(f"the original implementation in {root} did not start")

    def time(self, name: str, precision: str, batch: int) -> float | str:
        self.proc.stdin.write(f"{name} {precision} {batch} {self.warmup} {self.iters}\n")
        self.proc.stdin.flush()
        answer = self._answer()
        return answer if answer.startswith("error") else float(answer)


def original_status(root: Optional[Path]) -> Optional[str]:
    """Why the original implementation cannot run here, or None when it can."""
    if root is None:
        return ("no checkout of the original implementation on this machine; pass --original PATH or set "
                "DVT_ORIGINAL to its repository")
    if not (root / "models_deit.py").is_file():
        return f"{root} is not a checkout of the original implementation (no models_deit.py)"
    return None


# ---------------------------------------------------------------------------- sections

class Report:
    """Markdown written to ``path`` section by section (a section is lost only while it runs)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.write_text("")

    def write(self, lines: Sequence[str]) -> None:
        text = "\n".join(lines) + "\n\n"
        with open(self.path, "a") as f:
            f.write(text)
        print(text, end="", flush=True)


@contextlib.contextmanager
def section(report: Report, clock: Clock, name: str, title: str) -> Iterator[list[str]]:
    """Collect a section's lines; write them when it ends, also when time runs out in it."""
    clock.start(name)
    lines = [f"### {title}", ""]
    try:
        yield lines
    except TimeUp:
        lines += ["", "stopped: the benchmark step reached its time limit"]
        report.write(lines)
        raise
    except Exception as e:  # noqa: BLE001  (a failed section is reported; the others still run)
        lines += ["", f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"]
    report.write(lines)


def gmacs_per_image(name: str, model: torch.nn.Module, img_size: int) -> float:
    return exit_gflops(model, img_size)[-1] if name.startswith("DVT_") else model_gmacs(model, img_size)


def ceilings(plan: Plan, device: torch.device, lines: list[str]) -> dict[str, float]:
    n = 8192 if device.type == "cuda" else 512
    peaks = {}
    lines += [f"Square matrix products of size {n}, best of 5 (TFLOP/s)", "",
              "| dtype | TFLOP/s |", "|---|---:|"]
    for p in plan.precisions:
        dtype = AMP[p] or torch.float32
        peaks[p] = matmul_peak(dtype, device, n=n) / 1e3
        lines.append(f"| {p} | {peaks[p]:.3g} |")
    if device.type == "cuda":
        lines += ["", f"float32 products as the models run them: TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, "
                      f"TF32 cuDNN {torch.backends.cudnn.allow_tf32}"]
    return peaks


def all_exits(plan: Plan, device: torch.device, clock: Clock, original: Optional[OriginalOnDevice],
              original_note: Optional[str], lines: list[str]) -> dict[tuple[str, str, int], float]:
    """Images/second of every exit's forward; returns them by (model, precision, batch)."""
    lines += [f"{plan.img_size} px, median of {plan.iters} calls after {plan.warmup}; autocast for bf16 and fp16 "
              "(weights stay float32)", "",
              "| model | implementation | precision | batch | GMACs/img | img/s | TFLOP/s | vs ours fp32 | "
              "vs timm static, same precision |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    rates: dict[tuple[str, str, int], float] = {}
    gen = torch.Generator().manual_seed(0)
    images = {b: torch.randn(b, 3, plan.img_size, plan.img_size, generator=gen).to(device) for b in plan.batches}
    names = [plan.baseline] + plan.models
    for name in names:
        if clock.left() <= 0:
            lines.append(f"| {name} | | | | | skipped (time) | | | |")
            continue
        model = build(name, plan.img_size, device, torch.float32)
        gmacs = gmacs_per_image(name, model, plan.img_size)
        impl = "timm (static)" if name == plan.baseline else "this"
        for batch in plan.batches:
            for p in plan.precisions:
                if clock.left() <= 0:
                    lines.append(f"| {name} | {impl} | {p} | {batch} | {gmacs:.3f} | skipped (time) | | | |")
                    continue
                with autocast_context(device, AMP[p]):
                    t = seconds_per_call(lambda m=model, x=images[batch]: m(x), device, plan.warmup, plan.iters)
                rates[(name, p, batch)] = batch / t
                lines.append(row(name, impl, p, batch, gmacs, rates, plan.baseline))
            if original is not None and name != plan.baseline:
                for p in plan.precisions:
                    if clock.left() <= 0:
                        lines.append(f"| {name} | original | {p} | {batch} | {gmacs:.3f} | skipped (time) | | | |")
                        continue
                    t = original.time(name, p, batch)
                    if isinstance(t, str):
                        lines.append(f"| {name} | original | {p} | {batch} | {gmacs:.3f} | {t} | | | |")
                        continue
                    rates[(f"original {name}", p, batch)] = batch / t
                    lines.append(row(f"original {name}", "original", p, batch, gmacs, rates, plan.baseline))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if original is None:
        lines += ["", f"original implementation: not run ({original_note})"]
    else:
        lines += ["", "ours against the original (img/s ratio, same precision and batch):", ""]
        for name in plan.models:
            cells = [f"{p} b{b} {rates[(name, p, b)] / rates[(f'original {name}', p, b)]:.2f}x"
                     for b in plan.batches for p in plan.precisions
                     if (name, p, b) in rates and (f"original {name}", p, b) in rates]
            lines.append(f"- {name}: {', '.join(cells) or '-'}")
    return rates


def row(key: str, impl: str, p: str, batch: int, gmacs: float, rates: dict, baseline: str) -> str:
    """One line of the all-exit table; ``key`` is the model name (``original NAME`` for the original)."""
    name = key.removeprefix("original ")
    ips = rates[(key, p, batch)]
    ref = rates.get((name, "fp32", batch))
    static = rates.get((baseline, p, batch))
    vs_ref = f"{ips / ref:.2f}x" if ref and key != baseline else "-"
    vs_static = f"{ips / static:.2f}x" if static and name != baseline else "-"
    return (f"| {name} | {impl} | {p} | {batch} | {gmacs:.3f} | {ips:.1f} | {2 * gmacs * ips / 1e3:.3g} | {vs_ref} | "
            f"{vs_static} |")


def early_exit(plan: Plan, device: torch.device, clock: Clock, lines: list[str]) -> None:
    """``benchmark.early_exit_vs_static`` per model and batch (each against the static model of
    the accuracy it matches), its tables joined into one."""
    header_done, skipped = False, []
    for batch in plan.batches:
        for name in plan.early_models:
            if clock.left() <= 0:
                skipped.append(f"{name} at batch {batch}")
                continue
            args = benchmark_args(["--early-exit", "--models", name, "--batch", str(batch), "--img-size",
                                   str(plan.img_size), "--baseline", plan.baseline, "--budget-index",
                                   str(plan.budget_index), "--repeats", str(plan.iters),
                                   "--pool", str(plan.pool)])  # its defaults for the rest
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                early_exit_vs_static(args, device, plan.early_dtypes)
            table = [line for line in out.getvalue().splitlines() if line.startswith("|")]
            if not header_done:
                lines += [f"Budget row p = {plan.budget_index}, weights converted to each dtype "
                          f"(model.to(dtype)), one pool of images per batch size, best of {plan.iters} rounds",
                          "", table[0], table[1]]
                header_done = True
            lines += table[2:]
    if skipped:
        lines += ["", f"skipped (time): {', '.join(skipped)}"]


def training(plan: Plan, device: torch.device, clock: Clock, lines: list[str]) -> None:
    """``bench_train.train_steps`` (timed with a device synchronisation around each step) and the
    peak memory the allocator held."""
    lines += [f"{plan.img_size} px, batch {plan.train_batch} per GPU, all exits, summed loss, backward, AdamW step; "
              f"median of {plan.iters} steps after {plan.warmup}", "",
              "| model | precision | batch | s/step | img/s per GPU | peak memory GiB |",
              "|---|---|---:|---:|---:|---:|"]
    for name in plan.train_models:
        for p in plan.train_precisions:
            if clock.left() <= 0:
                lines.append(f"| {name} | {p} | {plan.train_batch} | skipped (time) | | |")
                continue
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            times = train_steps(name, plan.img_size, plan.train_batch, AMP[p], device, plan.warmup, plan.iters)
            step = statistics.median(times)
            peak = f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f}" if device.type == "cuda" else "-"
            rate = plan.train_batch / step
            lines.append(f"| {name} | {p} | {plan.train_batch} | {step:.3f} | {rate:.1f} | {peak} |")


def compiled(plan: Plan, device: torch.device, clock: Clock, eager: dict[tuple[str, str, int], float],
             lines: list[str]) -> None:
    """torch.compile (one graph for every batch size) against the eager rates of the all-exit table."""
    lines += [f"backend {plan.compile_backend}; compile s: the first call (tracing and code generation); "
              "largest difference: against eager on the same images", "",
              "| model | precision | compile s | batch | eager img/s | compiled img/s | speed-up | largest diff. |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    gen = torch.Generator().manual_seed(0)
    images = {b: torch.randn(b, 3, plan.img_size, plan.img_size, generator=gen).to(device) for b in plan.batches}
    for name, p in plan.compile_cases:
        if clock.left() < plan.compile_min_s:
            lines.append(f"| {name} | {p} | skipped (time) | | | | | |")
            continue
        torch._dynamo.reset()
        model = build(name, plan.img_size, device, torch.float32)
        fn = compile_model(model, backend=plan.compile_backend)
        x = images[plan.batches[0]]
        with torch.inference_mode(), autocast_context(device, AMP[p]):
            start = time.perf_counter()
            out = fn(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            compile_s = time.perf_counter() - start
            ref = model(x)
            out, ref = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
            diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(out, ref))
            for batch in plan.batches:
                t = seconds_per_call(lambda f=fn, x=images[batch]: f(x), device, plan.warmup, plan.iters)
                rate = batch / t
                base = eager.get((name, p, batch))
                eager_cell, speedup = (f"{base:.1f}", f"{rate / base:.2f}x") if base else ("-", "-")
                lines.append(f"| {name} | {p} | {compile_s:.0f} | {batch} | {eager_cell} | {rate:.1f} | {speedup} | "
                             f"{diff:.1e} |")
        del model, fn
        if device.type == "cuda":
            torch.cuda.empty_cache()


def bench(args: argparse.Namespace) -> int:
    plan = dry_plan() if args.dry_run else gpu_plan()
    if args.compile_backend:
        plan.compile_backend = args.compile_backend
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: bench needs a CUDA device (use --dry-run on the CPU)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    signal.signal(signal.SIGTERM, _raise_time_up)
    report = Report(args.out)
    clock = Clock(args.budget_s, {"ceilings": 0.03, "all": 0.3, "early": 0.15, "train": 0.15, "compile": 0.37})
    note = original_status(args.original)
    if note is None and args.dry_run and not set(plan.models) & {"DVT_T2t_vit_12", "DVT_T2t_vit_14", "DVT_Deit_small"}:
        note = "dry run: the original implementation has no DVT_tiny"
    original = None
    try:
        with section(report, clock, "ceilings", f"Matrix-product ceilings on {device.type}") as lines:
            lines.append(f"machine: {machine_description(device)}")
            lines.append("")
            ceilings(plan, device, lines)
        rates: dict = {}
        with section(report, clock, "all", "All exits: ours, the original, timm's static model") as lines:
            if note is None:
                try:
                    original = OriginalOnDevice(args.original, device, plan.img_size, plan.warmup, plan.iters)
                except RuntimeError as e:
                    note = str(e)
            rates = all_exits(plan, device, clock, original, note, lines)
        if original is not None:
            original.close()
            original = None
        with section(report, clock, "early", f"Real early exit against {plan.baseline}") as lines:
            early_exit(plan, device, clock, lines)
        with section(report, clock, "train", "Training throughput with autocast") as lines:
            training(plan, device, clock, lines)
        with section(report, clock, "compile", "torch.compile against eager, all exits") as lines:
            compiled(plan, device, clock, rates, lines)
    except TimeUp:
        if original is not None:
            original.proc.kill()  # mid-call: no waiting for it
        return 0
    finally:
        if original is not None:
            original.close()
    if plan.not_here:
        if plan.compile_backend != "inductor":
            plan.not_here.append(f"torch.compile with inductor (here: {plan.compile_backend})")
        report.write(["### Left to a GPU", "", *[f"- {item}" for item in plan.not_here]])
    return 0


# ------------------------------------------------------------------ machine and tests

def _run(cmd: Sequence[str]) -> Optional[str]:
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def nccl_version() -> str:
    if not torch.cuda.is_available():
        return "-"
    version = torch.cuda.nccl.version()
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def machine(args: argparse.Namespace) -> int:
    """The GPU, its driver, the software versions and the CPU."""
    lines = ["| what | value |", "|---|---|"]
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm",
                "--format=csv,noheader"])
    lines.append(f"| nvidia-smi (name, driver, memory, power limit, max SM clock) | {smi or 'not available'} |")
    driver_cuda = re.search(r"CUDA Version: *([0-9.]+)", _run(["nvidia-smi"]) or "")
    if driver_cuda:
        lines.append(f"| CUDA version of the driver | {driver_cuda.group(1)} |")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(f"| torch sees | {torch.cuda.device_count()} x {props.name}, compute capability "
                     f"{props.major}.{props.minor}, {props.multi_processor_count} SMs, "
                     f"{props.total_memory / 2 ** 30:.0f} GiB |")
    else:
        lines.append("| torch sees | no CUDA device |")
    import torchvision

    lines += [
        f"| torch | {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
        f"NCCL {nccl_version()}) |",
        f"| torchvision, timm | {torchvision.__version__}, {timm.__version__} |",
        f"| python | {platform.python_version()} ({sys.executable}) |",
        f"| CPU | {cpu_description()}, {len(os.sched_getaffinity(0))} cores available |",
        f"| CPU bf16/AMX flags | {' '.join(sorted(f for f in cpu_flags() if 'bf16' in f or 'amx' in f)) or '-'} |",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


@dataclass
class TestResult:
    name: str
    outcome: str
    seconds: Optional[float] = None
    note: str = ""


def junit_results(path: Path) -> list[TestResult]:
    """One result per test case of a pytest --junitxml file."""
    results = []
    for case in ET.parse(path).getroot().iter("testcase"):
        module = case.get("classname", "").rsplit(".", 1)[-1]
        name = f"{module}::{case.get('name')}" if module else case.get("name", "")
        outcome, note = "passed", ""
        for kind in ("failure", "error", "skipped"):
            found = case.find(kind)
            if found is not None:
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[kind]
                note = (found.get("message") or found.text or "").strip().splitlines()
                note = note[0][:200] if note else ""
                break
        results.append(TestResult(name, outcome, float(case.get("time", 0)), note))
    return results


def log_results(text: str) -> list[TestResult]:
    """Results from the lines of ``pytest -v`` (``path::name OUTCOME``), for a run stopped before
    it wrote its junit file."""
    results = []
    for line in text.splitlines():
        for word in ("PASSED", "FAILED", "ERROR", "SKIPPED"):
            head, sep, _ = line.partition(f" {word}")
            if sep and "::" in head and " " not in head.strip():
                module, _, test = head.strip().partition("::")
                results.append(TestResult(f"{Path(module).stem}::{test}",
                                          {"PASSED": "passed", "SKIPPED": "skipped"}.get(word, word)))
                break
    return results


def tests(args: argparse.Namespace) -> int:
    """The per-test table of the cuda tests, from the junit file, else from the log; tests that
    were collected and have no result did not run before the time limit."""
    junit, log = Path(args.junit), Path(args.log)
    results = junit_results(junit) if junit.is_file() else log_results(log.read_text() if log.is_file() else "")
    seen = {r.name for r in results}
    if args.collected and Path(args.collected).is_file():
        for line in Path(args.collected).read_text().splitlines():
            if "::" in line and " " not in line.strip():
                module, _, test = line.strip().partition("::")
                name = f"{Path(module).stem}::{test}"
                if name not in seen:
                    results.append(TestResult(name, "not run (time)"))
    counts: dict[str, int] = {}
    for r in results:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    source = "junit file" if junit.is_file() else "pytest log (no junit file: the run was stopped)"
    lines = [", ".join(f"{n} {k}" for k, n in counts.items()) + f" (from the {source})", "",
             "| test | result | s | note |", "|---|---|---:|---|"]
    for r in results:
        secs = f"{r.seconds:.1f}" if r.seconds is not None else ""
        lines.append(f"| {r.name} | {r.outcome} | {secs} | {r.note.replace('|', '/')} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("bench", help="the benchmark sections")
    p.add_argument("--out", type=Path, required=True, help="markdown file to write")
    p.add_argument("--dry-run", action="store_true", help="on the CPU with DVT_tiny and tiny batches")
    p.add_argument("--budget-s", type=float, default=240.0, help="seconds for all sections together")
    p.add_argument("--original", type=Path, default=None, help="checkout of the original implementation")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default: inductor; dry run: "
                                                           "aot_eager)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(fn=bench)
    p = sub.add_parser("machine", help="GPU, driver, versions, CPU")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(fn=machine)
    p = sub.add_parser("tests", help="per-test table of a pytest run")
    p.add_argument("--junit", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--collected", default=None, help="output of pytest --collect-only -q")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(fn=tests)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())

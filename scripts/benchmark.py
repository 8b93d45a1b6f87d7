"""Inference speed of the DVT cascades, side by side in one run, with the machine it ran on.

    python scripts/benchmark.py                                     # released models: ours fp32/bf16, timm DeiT-S
    python scripts/benchmark.py --original /path/to/Dynamic-Vision-Transformer   # + the original code, fp32
    python scripts/benchmark.py --models DVT_Deit_small --stages --early-exit --latency 40
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        python scripts/benchmark.py --dtypes fp32        # an AVX-512 CPU running the code of an AVX2-only one

Sections (each a markdown table; every row is timed in the same rounds as the others):

* machine: CPU model (or GPU), ``torch.backends.cpu.get_cpu_capability()``, the CPU's
  bf16/AMX flags, threads, versions, and the measured matmul peak of each dtype;
* all exits: images/second and achieved GFLOP/s (2 x multiply-adds x images/second) of the
  original implementation in float32 (when ``--original`` gives its repository), ours in
  float32 and bf16 (fp16 too on CUDA: weights converted once, ``model.to(dtype)``), and a
  static timm model of the same family (``--baseline``, default ``deit_small_patch16_224``),
  with the ratios the project tracks;
* ``--stages``: each stage and each reuse path timed alone (inputs prepared beforehand), with
  its multiply-adds and GFLOP/s;
* ``--early-exit``: real early exit at the exit shares of budget row ``--budget-index`` (default
  10: the shares at which the paper's T2T-ViT-14 cascade matches its static model) against the
  static model of matched accuracy (``STATIC_MATCH``; ``--static`` overrides, e.g.
  ``DVT_Deit_small=DeiT-S`` for DeiT-S built from this code), same dtype, for
  each batch size of ``--ee-batches``: one pool of images (a multiple of 7 and of the batch, at
  least ``--pool``, default 112) run batch by batch, the thresholds fitted on the pool itself
  (seeded random weights), so the realised shares are the budget's; batch 1 adds per-image
  median and p90 latency; from batch 2 on, "queued" runs the pool as one stream
  (``DVT.queued_early_exit``: the samples that go on wait until a full batch of them is there);
  ``--whole-last-blocks`` adds a table of early exit against itself with each stage's last block
  run for every token, as ``forward`` runs it, instead of for the class token first; ``--parts``
  adds, for each row, where the time of early exit (batch by batch and queued) and of the static
  model goes: embeddings, transformer blocks, the relation reuse's convolutions, the grid
  resampling of relations and features, the feature reuse's MLPs, and the rest (class token and
  positions, norms and heads, exit decisions, gathering the samples that go on), one more pass
  of each with every part timed on its own, and the operator calls per image of each (one pass
  in torch's profiler); ``--ee-compile`` compiles both sides with inductor and freezing, as
  ``inference.py --compile`` runs them (the warm-up round compiles every graph);
* ``--latency N``: batch-1 latency of real early exit, every exit and the static model over N images
  (median and 90th percentile, ms), and early exit's median by the exit an image leaves at;
* ``--compile``: ``torch.compile`` (inductor, freezing) against eager, all exits and real early
  exit: compile time, images/second, largest difference;
* ``--products ROWS ...``: float32 on the CPU, the linear layers of each model's first stage
  (every block's four, weights read block after block as inference reads them) at each row
  count (tokens x images), torch's plain product against oneDNN's on packed weights, the packed
  ones again reading the first block's four weights in every block (in cache: what streaming
  the weights from memory costs), and how many of them float32 inference runs packed at that
  count here (``models.layers.fused_inference``).

Timing: a warm-up call, then ``--repeats`` rounds in which every configuration runs once in
turn (``--early-exit``: batch by batch, early exit and the static model in turn on each batch);
the best round of each is kept (on a shared machine other processes only add time), so ratios
within a table come from the same minutes. The original implementation runs in a
child process (its vendored timm would shadow the installed one), driven round by round from
here so it is interleaved too.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402

import models  # noqa: E402,F401  (registers the DVT models)
from models.deploy import CompiledCascade, compile_model  # noqa: E402
from models.dvt import StageOutput  # noqa: E402
from models.factory import is_cascade_name, unknown_model_message  # noqa: E402
from models.layers import fused_inference, fused_linear_works, packed_weight, packing_works  # noqa: E402
from models.registry import MODEL_CFGS  # noqa: E402
from utils.budget.flops import counting_copy, exit_gflops  # noqa: E402
from utils.budget.thresholds import budget_exit_shares, find_thresholds  # noqa: E402
from utils.precision import cpu_has_native_bf16  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RELEASED = ["DVT_T2t_vit_12", "DVT_T2t_vit_14", "DVT_Deit_small"]
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
# Settings of the memory allocator: they change CPU timings at large batches (page faults).
ALLOCATOR_ENV = ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


# ----------------------------------------------------------------------------- machine

def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


def machine_description(device: torch.device) -> str:
    """The device, its capability and the software versions, for the line under a table."""
    versions = f"torch {torch.__version__}, timm {timm.__version__}, python {platform.python_version()}"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {versions}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    flags = sorted(f for f in cpu_flags() if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"))
    # Instruction-set caps (torch's own kernels, oneDNN, MKL): with all three at AVX2 an AVX-512
    # CPU runs the code an AVX2-only CPU runs.
    caps = [f"{k}={os.environ[k]}" for k in ISA_CAPS if os.environ.get(k)]
    allocator = [f"{k}={os.environ[k]}" for k in ALLOCATOR_ENV if os.environ.get(k)]
    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"get_cpu_capability() = {torch.backends.cpu.get_cpu_capability()}, flags: {' '.join(flags) or '-'}"
            f"{', capped by ' + ' '.join(caps) if caps else ''}"
            f"; allocator: {' '.join(allocator) if allocator else 'default'}; {versions}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """Best GFLOP/s of an n x n x n matrix product in ``dtype``."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


# ------------------------------------------------------------------------------ timing

def race(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Best seconds of each callable: one warm-up call each, then ``repeats`` rounds in turn."""
    best = {name: float("inf") for name in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def count_gmacs(fn: Callable[[], object]) -> float:
    """Multiply-adds (G) that ``fn`` performs, counted with torch's FLOP counter."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn()
    return counter.get_total_flops() / 2e9


def model_gmacs(model: torch.nn.Module, img_size: int) -> float:
    """Multiply-adds (G) per image of ``model(x)``, every attention on its explicit path."""
    clone = counting_copy(model)
    x = torch.zeros(1, 3, img_size, img_size)
    return count_gmacs(lambda: clone(x))


# --------------------------------------------------------------- original implementation

_WORKER = r'''
import sys, time, types, collections.abc
import torch
six = types.ModuleType("torch._six")  # removed from torch; the vendored timm of the original imports it
six.container_abcs, six.string_classes, six.int_classes, six.inf = collections.abc, (str, bytes), int, float("inf")
sys.modules["torch._six"] = six
if not torch.cuda.is_available():
    torch.Tensor.cuda = lambda self, *a, **k: self  # the original moves tensors with .cuda() inside forward
root, threads, batch, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
sys.path.insert(0, root)
import models, models_deit  # noqa: registers the original DVT models in the vendored timm
from timm.models import create_model
torch.manual_seed(0)
x = torch.randn(batch, 3, size, size)
built = {}
print("seconds ready", flush=True)
for line in sys.stdin:
    name = line.strip()
    if name not in built:
        built[name] = create_model(name).eval()
    with torch.inference_mode():
        start = time.perf_counter()
        built[name](x)
        print("seconds", time.perf_counter() - start, flush=True)
'''


class OriginalWorker:
    """The original implementation in a child process; ``run(name)`` times one batch there."""

    def __init__(self, root: Path, threads: int, batch: int, img_size: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(root), str(threads), str(batch), str(img_size)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=str(root))
        if self._answer() != "ready":
            raise RuntimeError(f"the original implementation in {root} did not start")

    def _answer(self) -> str:
        """The next line of ours (the original prints its own lines too)."""
        for line in self.proc.stdout:
            if line.startswith("seconds "):
                return line.split(" ", 1)[1].strip()
        raise RuntimeError("the original implementation stopped")

    def run(self, name: str) -> float:
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        return float(self._answer())

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ---------------------------------------------------------------------------- sections

def build(name: str, img_size: int, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A seeded model for ``img_size`` inputs. Transformers of timm are built for that size
    (position tables); models that take no ``img_size`` (convolutional ones) take any size."""
    torch.manual_seed(0)
    try:
        model = timm.create_model(name, img_size=img_size)
    except TypeError:
        if name.startswith("DVT_"):
            raise
        torch.manual_seed(0)
        model = timm.create_model(name)
    return model.eval().requires_grad_(False).to(device=device, dtype=dtype)


def all_exits(args: argparse.Namespace, device: torch.device, dtypes: Sequence[str],
              original: Optional[OriginalWorker]) -> list[dict]:
    """Every model in every dtype (and the original, fp32), timed in the same rounds."""
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    fns, gmacs, rows = {}, {}, []
    for name in args.models + [args.baseline]:
        fp32 = build_static(name, args.img_size, torch.device("cpu"), torch.float32)
        gmacs[name] = exit_gflops(fp32, args.img_size)[-1] if name.startswith("DVT_") else \
            model_gmacs(fp32, args.img_size)
        for d in dtypes:
            model = build_static(name, args.img_size, device, DTYPES[d])
            fns[(name, d)] = (lambda m, xd: lambda: m(xd))(model, x.to(DTYPES[d]))
        if original is not None and name.startswith("DVT_"):
            fns[(name, "original")] = None
    best = {key: float("inf") for key in fns}
    for r in range(args.repeats + 1):  # round 0 is the warm-up
        for key, fn in fns.items():
            t = original.run(key[0]) if fn is None else _time_once(fn, device)
            if r:
                best[key] = min(best[key], t)
    for (name, d), t in best.items():
        ips = args.batch / t
        rows.append(dict(model=name, impl="original" if d == "original" else "this", dtype="fp32" if d == "original"
                         else d, img_per_s=ips, gmacs=gmacs[name], gflop_per_s=2 * gmacs[name] * ips))
    return rows


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    with torch.inference_mode():
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - start


def print_all_exits(rows: list[dict], args: argparse.Namespace, dtypes: Sequence[str], peaks: dict[str, float]) -> None:
    by = {(r["model"], r["impl"], r["dtype"]): r for r in rows}
    base = args.baseline
    print(f"\n### All exits, batch {args.batch}, {args.img_size}px, best of {args.repeats} rounds\n")
    print("| model | GMACs/img | implementation | dtype | img/s | GFLOP/s | % of matmul peak | vs ours fp32 "
          "| vs original fp32 |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|")
    for name in args.models + [base]:
        ref = by.get((name, "this", "fp32"))
        orig = by.get((name, "original", "fp32"))
        for impl, d in [("original", "fp32")] + [("this", d) for d in dtypes]:
            r = by.get((name, impl, d))
            if r is None:
                continue
            label = ("this code (static)" if base in STATIC_OURS else "timm (static)") if name == base else impl
            vs_ref = f"{r['img_per_s'] / ref['img_per_s']:.2f}x" if ref else "-"
            vs_orig = f"{r['img_per_s'] / orig['img_per_s']:.2f}x" if orig else "-"
            print(f"| {name} | {r['gmacs']:.3f} | {label} | {d} | {r['img_per_s']:.1f} | {r['gflop_per_s']:.0f} | "
                  f"{100 * r['gflop_per_s'] / peaks[d]:.0f}% | {vs_ref} | {vs_orig} |")
    print(f"\nPer-FLOP throughput against {base} in the same dtype (GFLOP/s ratio):\n")
    print("| model | " + " | ".join(dtypes) + " |")
    print("|---|" + "---:|" * len(dtypes))
    for name in args.models:
        cells = []
        for d in dtypes:
            r, b = by.get((name, "this", d)), by.get((base, "this", d))
            cells.append(f"{r['gflop_per_s'] / b['gflop_per_s']:.0%}" if r and b else "-")
        print(f"| {name} | " + " | ".join(cells) + " |")


def stage_breakdown(args: argparse.Namespace, device: torch.device, dtypes: Sequence[str]) -> None:
    """Each stage and each reuse path timed alone, with its multiply-adds and GFLOP/s."""
    for name in args.models:
        clone = counting_copy(build(name, args.img_size, torch.device("cpu"), torch.float32))
        x1 = torch.zeros(1, 3, args.img_size, args.img_size)
        with torch.no_grad():
            prev1 = [None] + list(clone.iter_stages(x1))[:-1]
        parts = _stage_parts(clone, x1, prev1)
        macs = {label: count_gmacs(fn) for label, fn in parts.items()}
        print(f"\n### {name}: stages and reuse paths, batch {args.batch}, each timed alone, best of {args.repeats}\n")
        print("| part | GMACs/img | " + " | ".join(f"{d} ms | {d} GFLOP/s" for d in dtypes) + " |")
        print("|---|---:|" + "---:|---:|" * len(dtypes))
        times = {}
        for d in dtypes:
            model = build(name, args.img_size, device, DTYPES[d])
            x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device, dtype=DTYPES[d])
            with torch.inference_mode():
                prev = [None] + list(model.iter_stages(x))[:-1]
            times[d] = race(_stage_parts(model, x, prev), args.repeats, device)
        for label, g in macs.items():
            cells = [f"{times[d][label] * 1e3:.1f} | {2 * g * args.batch / times[d][label]:.0f}" for d in dtypes]
            print(f"| {label} | {g:.3f} | " + " | ".join(cells) + " |")


def _stage_parts(model, x: torch.Tensor, prev: list) -> dict[str, Callable[[], object]]:
    parts = {}
    for k, stage in enumerate(model.stages):
        export = model._exports_relations(k)
        parts[f"stage {k + 1} (all of it)"] = (lambda s, p, e: lambda: s(x, p, export_relations=e))(
            stage, prev[k], export)
        parts[f"stage {k + 1} embedding"] = (lambda s: lambda: s.embed(x))(stage)
        if stage.relation_reuse:
            # every block's bias built (in eager inference they are resampled block by block)
            parts[f"stage {k + 1} relation reuse"] = (lambda s, p: lambda: list(s._relation_biases(p.relations)))(
                stage, prev[k])
            if x.device.type == "cpu":  # side by side: the reference products
                parts[f"stage {k + 1} relation reuse, reference products"] = (
                    lambda s, p: lambda: _reference_biases(s, p.relations))(stage, prev[k])
        if stage.feature_reuse:  # what the stage runs: every block's at once in eager inference
            parts[f"stage {k + 1} feature reuse"] = (lambda s, p: lambda: s._all_reused_features(p.tokens) if
                                                     s._batched_reuse() else [s._reused_features(b, p.tokens)
                                                                              for b in s.blocks])(stage, prev[k])
    return parts


def _reference_biases(stage, relations) -> list:
    """A stage's relation biases on the reference products (``cpu_kernels`` off for the call)."""
    kept, stage.cpu_kernels = stage.cpu_kernels, False
    try:
        return list(stage._relation_biases(relations))
    finally:
        stage.cpu_kernels = kept


# The static model each cascade is timed against at matched accuracy (``--early-exit``).
# DeiT-S (79.8%) for the DeiT cascade (exits 72.7 / 79.0 / 81.8%). The T2T cascades are matched
# with the static T2T-ViT they were built from (T2T-ViT-14: 81.5%, T2T-ViT-12: 76.5%): timm has
# no T2T-ViT, so it is built from this code, the cascade's last stage alone without reuse (the
# same kernels, so the ratio is that of the cascade alone).
STATIC_MATCH = {"DVT_Deit_small": "deit_small_patch16_224", "DVT_T2t_vit_14": "T2T-ViT-14",
                "DVT_T2t_vit_12": "T2T-ViT-12"}
# Static models built from this code: the cascade's last stage alone (14x14 tokens), no reuse.
# "DeiT-S" is timm's deit_small_patch16_224 in this code's kernels (``--static
# DVT_Deit_small=DeiT-S``): against it the ratio is the cascade's alone, as for the T2T-ViTs.
STATIC_OURS = {"T2T-ViT-14": ("DVT_T2t_vit_14", dict(t2t_geometries=((7, 4, 2),))),
               "T2T-ViT-12": ("DVT_T2t_vit_12", dict(t2t_geometries=((7, 4, 2),))),
               "DeiT-S": ("DVT_Deit_small", dict(grids=(14,)))}


def product_paths(args: argparse.Namespace, device: torch.device) -> None:
    """--products: a first stage's linear layers, plain products against oneDNN's on packed weights,
    and the packed products again with the first block's four weights read in every block (kept
    in cache, where the stage streams each block's weights from memory)."""
    if device.type != "cpu" or not (fused_linear_works(torch.float32) and packing_works()):
        print("\n--products left out: it needs the CPU and a torch with oneDNN's fused linear and weight packing")
        return
    print(f"\n### Linear layers of a first stage, float32: plain against packed products, best of {args.repeats}\n")
    print("| model | rows | products | plain ms | packed ms | plain / packed | packed GFLOP/s | packed, weights in "
          "cache ms | packed / in cache | packed in float32 inference |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for name in args.models:
        linears = [layer for block in build(name, args.img_size, device, torch.float32).stages[0].blocks
                   for layer in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2)]
        for rows in args.products:
            xs = {layer.in_features: torch.randn(rows, layer.in_features) for layer in linears}
            plain = lambda: [F.linear(xs[m.in_features], m.weight, m.bias) for m in linears]  # noqa: E731
            packed = lambda: [torch.ops.mkldnn._linear_pointwise(  # noqa: E731
                xs[m.in_features], packed_weight(m.weight), m.bias, "none", [], "") for m in linears]
            cached = lambda: [torch.ops.mkldnn._linear_pointwise(  # noqa: E731
                xs[m.in_features], packed_weight(linears[i % 4].weight), m.bias, "none", [], "")
                for i, m in enumerate(linears)]
            best = race({"plain": plain, "packed": packed, "cached": cached}, args.repeats, device)
            with torch.no_grad():
                packs = sum(fused_inference(xs[m.in_features], m.weight) for m in linears)
            gflops = 2 * rows * sum(m.weight.numel() for m in linears) / best["packed"] / 1e9
            print(f"| {name} | {rows} | {len(linears)} | {best['plain'] * 1e3:.2f} | {best['packed'] * 1e3:.2f} | "
                  f"{best['plain'] / best['packed']:.2f}x | {gflops:.0f} | {best['cached'] * 1e3:.2f} | "
                  f"{best['packed'] / best['cached']:.2f}x | {packs} |")


def static_for(name: str, args: argparse.Namespace) -> str:
    """The static model ``name`` is timed against: ``--static NAME=MODEL``, the table above, else ``--baseline``."""
    overrides = dict(item.split("=", 1) for item in args.static)
    return overrides.get(name, STATIC_MATCH.get(name, args.baseline))


def build_static(name: str, img_size: int, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A seeded static model: a timm model, or one of ``STATIC_OURS`` (one 14x14 stage, no reuse)."""
    if name not in STATIC_OURS:
        return build(name, img_size, device, dtype)
    torch.manual_seed(0)
    cascade, stage = STATIC_OURS[name]
    model = timm.create_model(cascade, img_size=img_size, feature_reuse=False, relation_reuse=False, **stage)
    return model.eval().requires_grad_(False).to(device=device, dtype=dtype)


DEFAULT_POOL = 112  # images per batch size of --early-exit, at least


def pool_size(batch: int, at_least: int = DEFAULT_POOL) -> int:
    """Images timed per batch size: the smallest multiple of 7 (budget row 10's shares are 4/7,
    2/7, 1/7) and of the batch that is at least ``at_least`` (``--pool``)."""
    return 7 * batch * math.ceil(at_least / (7 * batch))


def early_exit_vs_static(args: argparse.Namespace, device: torch.device, dtypes: Sequence[str]) -> None:
    """Real early exit at the budget's exit shares against the static model of matched accuracy,
    batch by batch over one pool of images; batch 1 also gives per-image latency."""
    shares = budget_exit_shares(args.budget_index, 3).tolist()
    compiled = ", both compiled (inductor, freezing)" if args.ee_compile else ""
    print(f"\n### Real early exit (budget row p = {args.budget_index}, exit shares "
          f"{' / '.join(f'{q:.2f}' for q in shares)}) against the static model{compiled}, "
          f"best of {args.repeats} rounds\n")
    print("| model | static model | dtype | batch | images | exit shares realised | GMACs/img (static) | "
          "early exit img/s | static img/s | early exit / static | FLOPs promise | share of the promise | "
          "queued img/s | queued / static | batch-1 median ms (early / static) | batch-1 p90 ms (early / static) |")
    print("|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []  # (model, dtype, batch, row) for the tables after this one
    for name in args.models:
        static = static_for(name, args)
        flops = exit_gflops(build(name, args.img_size, torch.device("cpu"), torch.float32), args.img_size)
        base_gmacs = model_gmacs(build_static(static, args.img_size, torch.device("cpu"), torch.float32), args.img_size)
        for d in dtypes:
            model = build(name, args.img_size, device, DTYPES[d])
            base = build_static(static, args.img_size, device, DTYPES[d])
            if args.ee_compile:
                model, base = CompiledCascade(model, freeze=True), compile_model(base, freeze=True)
            for batch in args.ee_batches:
                row = _early_exit_row(model, base, batch, DTYPES[d], flops, args, device)
                gm, ratio, promise = row["gmacs"], row["early"] / row["static"], base_gmacs / row["gmacs"]
                lat = (f"{row['lat_early'][0]:.1f} / {row['lat_static'][0]:.1f} | "
                       f"{row['lat_early'][1]:.1f} / {row['lat_static'][1]:.1f}") if batch == 1 else "- | -"
                queued = f"{row['queued']:.1f} | {row['queued'] / row['static']:.2f}x" if batch > 1 else "- | -"
                print(f"| {name} | {static} | {d} | {batch} | {row['images']} | "
                      f"{' / '.join(f'{q:.3f}' for q in row['shares'])} | {gm:.2f} ({base_gmacs:.2f}) | "
                      f"{row['early']:.1f} | {row['static']:.1f} | {ratio:.2f}x | {promise:.2f}x | "
                      f"{ratio / promise:.0%} | {queued} | {lat} |")
                rows.append((name, d, batch, row))
    if args.whole_last_blocks:
        print_whole_last_blocks(rows)
    if args.parts:
        print_parts(rows)


PARTS = ("embedding", "transformer blocks", "relation reuse: convolutions", "grid resampling",
         "feature reuse: MLPs", "the rest")


def print_parts(rows: list) -> None:
    """``--parts``: milliseconds per image of each part, and its share of the time, in one more pass
    of early exit (batch by batch, and queued from batch 2 on) and of the static model; then the
    operators each calls per image."""
    print("\nWhere the time goes, ms per image (share of the time), one more pass of each, every part timed "
          "on its own:\n")
    print("| model | dtype | batch | part | early exit | queued | static model |")
    print("|---|---|---:|---|---:|---:|---:|")
    for name, d, batch, row in rows:
        runs = [row["parts"][k] for k in ("early", "queued", "static")]
        for part in (*PARTS, "all of it"):
            cells = []
            for parts in runs:
                if parts is None or part not in (*parts["seconds"], "all of it"):  # not run, or no such part
                    cells.append("-")
                    continue
                total = sum(parts["seconds"].values())
                sec = total if part == "all of it" else parts["seconds"][part]
                cells.append(f"{sec / parts['images'] * 1e3:.2f} ({sec / total:.0%})")
            print(f"| {name} | {d} | {batch} | {part} | {' | '.join(cells)} |")
        calls = ["-" if parts is None else f"{parts['calls']:.0f}" for parts in runs]
        print(f"| {name} | {d} | {batch} | operator calls per image | {' | '.join(calls)} |")


class PartTimer:
    """Wall time of a model's parts over some calls, each part's own: time spent in another timed
    part that it calls counts for that one. Parts are timed by wrapping methods of the modules
    themselves (instance attributes that shadow the class's), removed again by :meth:`close`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device  # on an accelerator each part waits for its kernels
        self.seconds: dict[str, float] = defaultdict(float)
        self._inner: list[float] = []  # per open call: seconds of the timed calls inside it
        self._wrapped: list[tuple[object, str]] = []

    def wrap(self, obj: object, name: str, part: str) -> None:
        method = getattr(obj, name)

        def timed(*args, **kwargs):
            self._inner.append(0.0)
            sync(self.device)
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                sync(self.device)
                spent = time.perf_counter() - start
                self.seconds[part] += spent - self._inner.pop()
                if self._inner:
                    self._inner[-1] += spent

        setattr(obj, name, timed)
        self._wrapped.append((obj, name))

    def wrap_model(self, model: torch.nn.Module) -> None:
        """The parts of a DVT cascade (or a static T2T-ViT built from it), or of a timm ViT."""
        for stage in getattr(model, "stages", ()):
            self.wrap(stage, "embed", "embedding")
            for method in ("_relation_biases", "_all_reused_features", "_reused_features"):
                part = "relation reuse: convolutions" if method == "_relation_biases" else "feature reuse: MLPs"
                self.wrap(stage, method, part)
            if stage.resample is not None:
                self.wrap(stage.resample, "forward", "grid resampling")
            self._wrap_blocks(stage.blocks)
        if hasattr(model, "patch_embed"):
            self.wrap(model.patch_embed, "forward", "embedding")
            self._wrap_blocks(model.blocks)

    def _wrap_blocks(self, blocks) -> None:
        for block in blocks:
            for method in ("forward", "attention_inputs", "finish"):
                if hasattr(block, method):
                    self.wrap(block, method, "transformer blocks")

    def close(self) -> None:
        for obj, name in reversed(self._wrapped):
            delattr(obj, name)
        self._wrapped.clear()


def _timed_parts(model: torch.nn.Module, run: Callable[[], object], images: int, device: torch.device) -> dict:
    """One call of ``run`` with the parts of ``model`` timed: seconds per part, ``the rest`` included;
    and, from one more call, the operators it calls per image (:func:`operator_calls`)."""
    timer = PartTimer(device)
    timer.wrap_model(model)
    try:
        total = _time_once(run, device)
    finally:
        timer.close()
    seconds = dict(timer.seconds)
    seconds["the rest"] = max(0.0, total - sum(seconds.values()))
    return dict(seconds=seconds, images=images, calls=operator_calls(run) / images)


def operator_calls(run: Callable[[], object]) -> int:
    """Operator calls in one call of ``run``, as torch's profiler records them on the CPU (every
    ATen and oneDNN operator, those that other operators call included). Each call costs its
    dispatch and the Python around it whatever its size: at small batches this is where early
    exit, which calls each stage for fewer images, pays more per image than the static model."""
    sys.stderr.flush()
    saved = os.dup(2)  # the profiler's library logs its start and stop on standard error: not for this table
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                run()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    return sum(event.count for event in prof.key_averages())


def print_whole_last_blocks(rows: list) -> None:
    """``--whole-last-blocks``: early exit against itself with every stage's last block run for every token."""
    print("\nEarly exit with the class token first against each stage's last block whole (same rounds):\n")
    print("| model | dtype | batch | class token first img/s | last blocks whole img/s | ratio | "
          "queued, class token first | queued, whole | ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, d, batch, row in rows:
        queued = (f"{row['queued']:.1f} | {row['queued_whole']:.1f} | {row['queued'] / row['queued_whole']:.3f}x"
                  if batch > 1 else "- | - | -")
        print(f"| {name} | {d} | {batch} | {row['early']:.1f} | {row['whole']:.1f} | "
              f"{row['early'] / row['whole']:.3f}x | {queued} |")


def _early_exit_row(model, base, batch: int, dtype: torch.dtype, flops: list[float], args: argparse.Namespace,
                    device: torch.device) -> dict:
    """Time one pool of images in batches of ``batch``: real early exit against the static model,
    interleaved round by round; per-image latency (best round of each image) at batch 1."""
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(pool_size(batch, args.pool), 3, args.img_size, args.img_size, generator=gen).to(device, dtype)
    thresholds = fitted_thresholds(model, images, args.budget_index, batch=min(batch, 32))
    batches = images.split(batch)
    with torch.inference_mode():
        exits = torch.cat([model.forward_early_exit(xb, thresholds).exit_index.cpu() for xb in batches])
    shares = (torch.bincount(exits, minlength=model.num_exits).double() / exits.numel()).tolist()
    fns = {"early": lambda xb: model.forward_early_exit(xb, thresholds), "static": lambda xb: base(xb)}
    streams = {"queued": None}
    if args.whole_last_blocks:
        whole = whole_stage_steps(model)
        fns["whole"] = lambda xb: model.forward_early_exit(xb, thresholds, steps=whole)
        streams["queued_whole"] = whole
    per_image = {k: [float("inf")] * len(batches) for k in fns}
    best = {k: float("inf") for k in (*fns, *streams)}
    for r in range(args.repeats + 1):  # round 0 is the warm-up
        times = {k: [] for k in fns}
        for xb in batches:  # each batch by every configuration in turn: both sides of a ratio see the same seconds
            for k, fn in fns.items():
                times[k].append(_time_once(lambda: fn(xb), device))
        for k, t in times.items() if r else ():
            best[k] = min(best[k], sum(t))
            per_image[k] = [min(a, b) for a, b in zip(per_image[k], t)]
        for k, steps in streams.items() if batch > 1 else ():  # the pool as one stream, later stages on full batches
            t = _time_once(lambda: list(model.queued_early_exit(batches, thresholds, steps=steps)), device)
            if r:
                best[k] = min(best[k], t)
    q = lambda v: (statistics.median(v) * 1e3, statistics.quantiles(v, n=10)[-1] * 1e3)  # noqa: E731
    parts = None
    if args.parts:
        n = images.shape[0]
        with torch.inference_mode():
            parts = dict(early=_timed_parts(model, lambda: [fns["early"](xb) for xb in batches], n, device),
                         static=_timed_parts(base, lambda: [fns["static"](xb) for xb in batches], n, device),
                         queued=_timed_parts(model, lambda: list(model.queued_early_exit(batches, thresholds)), n,
                                             device) if batch > 1 else None)
    return dict(images=images.shape[0], shares=shares, gmacs=sum(s * f for s, f in zip(shares, flops)),
                **{k: images.shape[0] / t for k, t in best.items()}, parts=parts,
                lat_early=q(per_image["early"]), lat_static=q(per_image["static"]))


class WholeStageStep(torch.nn.Module):
    """A stage as ``forward`` runs it, every block for every token, with the contract of
    :class:`models.dvt.ExitStep`: it hands on its final tokens and attention logits. Early exit
    on these steps is early exit without the class token first (``--whole-last-blocks``)."""

    def __init__(self, stage, export_relations: bool, last: bool) -> None:
        super().__init__()
        self.stage, self.export_relations, self.last = stage, export_relations, last

    def forward(self, x: torch.Tensor, *carry: torch.Tensor) -> tuple[torch.Tensor, ...]:
        prev = StageOutput(carry[0], carry[0], tuple(carry[1:]) or None) if carry else None
        out = self.stage(x, prev, export_relations=self.export_relations)
        confidence = out.logits.float().softmax(dim=-1).amax(dim=-1)
        return (out.logits, confidence) if self.last else (out.logits, confidence, out.tokens) + (out.relations or ())


def whole_stage_steps(model) -> list[WholeStageStep]:
    last = model.num_exits - 1
    return [WholeStageStep(stage, model._exports_relations(k), k == last) for k, stage in enumerate(model.stages)]


def fitted_thresholds(model: torch.nn.Module, images: torch.Tensor, budget_index: int, batch: int = 32) -> torch.Tensor:
    """Thresholds that give budget row ``budget_index``'s exit shares on ``images`` themselves:
    the weights are seeded random, so thresholds fitted elsewhere would not carry over. The
    confidences come in batches of ``batch`` (those that are timed: kernels round differently
    at other batch sizes, and in bf16 that moves samples near a threshold to another exit)."""
    shares = budget_exit_shares(budget_index, model.num_exits)
    with torch.inference_mode():
        conf = torch.cat([torch.stack(model(xb)).float().softmax(-1).amax(-1).cpu() for xb in images.split(batch)],
                         dim=1)
    return find_thresholds(conf, shares[None])[0].to(images.device)


def batch1_latency(args: argparse.Namespace, device: torch.device, dtypes: Sequence[str]) -> None:
    """Per-image latency, batch 1: real early exit against every exit and against the static model."""
    gen = torch.Generator().manual_seed(2)
    print(f"\n### Batch-1 latency over {args.latency} images (budget row p = {args.budget_index}), ms\n")
    print("| model | dtype | early exit median | early exit p90 | all exits median | all exits p90 | "
          "static model | static median | static p90 | exit shares | early exit median by exit |")
    print("|---|---|---:|---:|---:|---:|---|---:|---:|---|---|")
    for name in args.models:
        static = static_for(name, args)
        for d in dtypes:
            model = build(name, args.img_size, device, DTYPES[d])
            base = build_static(static, args.img_size, device, DTYPES[d])
            images = torch.randn(args.latency, 3, args.img_size, args.img_size, generator=gen).to(device, DTYPES[d])
            thresholds = fitted_thresholds(model, images, args.budget_index, batch=1)
            with torch.inference_mode():
                model.forward_early_exit(images[:1], thresholds)
                base(images[:1])
                early, full, flat, exits = [], [], [], []
                for i in range(args.latency):
                    xi = images[i:i + 1]
                    early.append(_time_once(lambda: exits.append(model.forward_early_exit(xi, thresholds)), device))
                    full.append(_time_once(lambda: model(xi), device))
                    flat.append(_time_once(lambda: base(xi), device))
            exit_index = torch.cat([e.exit_index.cpu() for e in exits])
            counts = torch.bincount(exit_index, minlength=model.num_exits)
            q = lambda v: statistics.quantiles(v, n=10)[-1] * 1e3  # noqa: E731  (90th percentile)
            med = lambda v: statistics.median(v) * 1e3  # noqa: E731
            shares = " / ".join(f"{c / args.latency:.2f}" for c in counts.tolist())
            # what an image costs by the exit it leaves at; weighted by the shares they make up the mean
            by_exit = [[t for t, k in zip(early, exit_index.tolist()) if k == j] for j in range(model.num_exits)]
            print(f"| {name} | {d} | {med(early):.1f} | {q(early):.1f} | {med(full):.1f} | {q(full):.1f} | {static} | "
                  f"{med(flat):.1f} | {q(flat):.1f} | {shares} | "
                  f"{' / '.join(f'{med(v):.1f}' if v else '-' for v in by_exit)} |")


def compile_speedup(args: argparse.Namespace, device: torch.device, dtypes: Sequence[str]) -> None:
    """torch.compile (inductor, with freezing as inference.py --compile runs it) against eager:
    compile time and images/second, all exits and real early exit (one compiled graph per
    stage, dynamic batch)."""
    gen = torch.Generator().manual_seed(3)
    print(f"\n### torch.compile against eager, batch {args.batch} (compile: the first calls)\n")
    print("| model | dtype | path | compile s | eager img/s | compiled img/s | speed-up | largest difference |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for name in args.models:
        for d in dtypes:
            model = build(name, args.img_size, device, DTYPES[d])
            x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=gen).to(device, DTYPES[d])
            thresholds = fitted_thresholds(model, x, args.budget_index)
            cascade = CompiledCascade(model, freeze=True)
            with torch.inference_mode():
                start = time.perf_counter()
                compiled_all = cascade(x)
                t_all = time.perf_counter() - start
                start = time.perf_counter()
                compiled_early = cascade.forward_early_exit(x, thresholds)
                t_early = time.perf_counter() - start
                diff_all = max((a.float() - b.float()).abs().max().item() for a, b in zip(compiled_all, model(x)))
                diff_early = (compiled_early.logits.float() - model.forward_early_exit(x, thresholds).logits.float()
                              ).abs().max().item()
            t = race({"eager all": lambda: model(x), "compiled all": lambda: cascade(x),
                      "eager early": lambda: model.forward_early_exit(x, thresholds),
                      "compiled early": lambda: cascade.forward_early_exit(x, thresholds)}, args.repeats, device)
            for path, tc, diff in (("all exits", t_all, diff_all), ("early exit", t_early, diff_early)):
                key = path.split()[0]
                e, c = args.batch / t[f"eager {key}"], args.batch / t[f"compiled {key}"]
                print(f"| {name} | {d} | {path} | {tc:.0f} | {e:.1f} | {c:.1f} | {c / e:.2f}x | {diff:.1e} |")


# --------------------------------------------------------------------------------- main

def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=RELEASED)
    parser.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES),
                        help="default: fp32, and bf16 where the CPU has it natively; fp32 bf16 fp16 on CUDA")
    parser.add_argument("--baseline", default="deit_small_patch16_224",
                        help=f"static model of the same family: a timm model, or {', '.join(STATIC_OURS)} built "
                             "from this code")
    parser.add_argument("--original", type=Path, default=None,
                        help="checkout of the original implementation: also time it (fp32)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (best kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--stages", action="store_true", help="per-stage and reuse-path breakdown")
    parser.add_argument("--early-exit", action="store_true",
                        help="real early exit against the static model of matched accuracy")
    parser.add_argument("--ee-batches", type=int, nargs="+", default=None, metavar="B",
                        help="batch sizes of --early-exit (default: --batch)")
    parser.add_argument("--pool", type=int, default=None, metavar="N",
                        help="images per batch size of --early-exit: the smallest multiple of 7 x the batch that is "
                             f"at least N (default {DEFAULT_POOL})")
    parser.add_argument("--static", nargs="+", default=[], metavar="MODEL=STATIC",
                        help="static model for a cascade in --early-exit/--latency: a timm model, or "
                             f"{', '.join(STATIC_OURS)} built from this code (default: matched accuracy, else "
                             "--baseline)")
    parser.add_argument("--latency", type=int, default=0, metavar="N", help="batch-1 latency over N images")
    parser.add_argument("--budget-index", type=int, default=10, help="budget row p (1..59) for early exit")
    parser.add_argument("--whole-last-blocks", action="store_true",
                        help="--early-exit also with each stage's last block run for every token (not the class "
                             "token first), side by side")
    parser.add_argument("--parts", action="store_true",
                        help="--early-exit also times the parts of each model (embeddings, blocks, reuse paths, "
                             "the rest) in one more pass")
    parser.add_argument("--compile", action="store_true", help="torch.compile against eager (compile time, speed-up)")
    parser.add_argument("--ee-compile", action="store_true",
                        help="--early-exit with both sides compiled by inductor with freezing, as inference.py "
                             "--compile runs (the warm-up round compiles)")
    parser.add_argument("--products", type=int, nargs="+", default=[], metavar="ROWS",
                        help="a first stage's linear layers at these row counts: plain against packed products")
    parser.add_argument("--no-all-exits", action="store_true", help="skip the all-exit table")
    parser.add_argument("--json", type=Path, default=None, help="also append the all-exit rows as JSON lines")
    args = parser.parse_args(argv)
    if args.original is not None and not (args.original / "models_deit.py").is_file():
        parser.error(f"--original {args.original}: not a checkout of the original implementation (no models_deit.py)")
    if args.pool is not None and args.pool < 1:
        parser.error("--pool needs at least 1 image")
    if args.latency == 1:
        parser.error("--latency needs at least 2 images")
    if any(rows < 1 for rows in args.products):
        parser.error("--products takes row counts of at least 1")
    if args.ee_batches is None:
        args.ee_batches = [args.batch]
    if any("=" not in item for item in args.static):
        parser.error("--static takes MODEL=STATIC pairs")
    for flag, given in (("--parts", args.parts), ("--whole-last-blocks", args.whole_last_blocks),
                        ("--pool", args.pool is not None), ("--ee-compile", args.ee_compile)):
        if given and not args.early_exit:
            parser.error(f"{flag} adds to --early-exit: pass --early-exit too")
    if args.ee_compile and (args.parts or args.whole_last_blocks):
        parser.error("--ee-compile times the compiled graphs whole: --parts and --whole-last-blocks time eager parts")
    args.pool = DEFAULT_POOL if args.pool is None else args.pool
    check_model_names(parser, args)
    return args


CASCADE_SECTIONS = ("stages", "early_exit", "latency", "compile", "products")


def check_model_names(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every name a timm model or one of ``STATIC_OURS``, and ``--models`` DVT cascades
    where a section runs their stages: refused before anything is built or timed."""
    static = [item.split("=", 1)[1] for item in args.static]
    for name in args.models + [args.baseline] + static:
        if name not in STATIC_OURS and not is_cascade_name(name):
            parser.error(f"{unknown_model_message(name)}; or a static model built from this code: "
                         f"{', '.join(STATIC_OURS)}")
    sections = [f"--{s.replace('_', '-')}" for s in CASCADE_SECTIONS if getattr(args, s)]
    singles = [name for name in args.models if name not in MODEL_CFGS]
    if sections and singles:
        parser.error(f"{' and '.join(sections)} time{'s' if len(sections) == 1 else ''} the stages of DVT cascades; "
                     f"{', '.join(singles)} {'is' if len(singles) == 1 else 'are'} not one (DVT models: "
                     f"{', '.join(MODEL_CFGS)}): time a static model with --baseline, or with --static MODEL=STATIC "
                     "against a cascade")


def default_dtypes(device: torch.device) -> list[str]:
    """fp32, bf16 and fp16 on CUDA; fp32, and bf16 where the CPU computes it natively."""
    if device.type == "cuda":
        return ["fp32", "bf16", "fp16"]
    return ["fp32", "bf16"] if cpu_has_native_bf16() else ["fp32"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtypes = args.dtypes or default_dtypes(device)
    print(f"command: python scripts/benchmark.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"machine: {machine_description(device)}")
    if args.dtypes is None and "bf16" not in dtypes:
        print("bf16 left out: this CPU has no native bfloat16 (emulated, about 100x slower than fp32); "
              "pass --dtypes fp32 bf16 to time it anyway")
    peaks = {d: matmul_peak(DTYPES[d], device) for d in dtypes}
    print("matmul peak (2048^3, best of 5): " + ", ".join(f"{d} {p:.0f} GFLOP/s" for d, p in peaks.items()))
    if not args.no_all_exits:
        original = None
        if args.original is not None:
            original = OriginalWorker(args.original, torch.get_num_threads(), args.batch, args.img_size)
        try:
            rows = all_exits(args, device, dtypes, original)
        finally:
            if original is not None:
                original.close()
        print_all_exits(rows, args, dtypes, peaks)
        if args.json:
            with open(args.json, "a") as f:
                for row in rows:
                    f.write(json.dumps(dict(row, batch=args.batch, device=str(device))) + "\n")
    if args.stages:
        stage_breakdown(args, device, dtypes)
    if args.early_exit:
        early_exit_vs_static(args, device, dtypes)
    if args.latency:
        batch1_latency(args, device, dtypes)
    if args.compile:
        compile_speedup(args, device, dtypes)
    if args.products:
        product_paths(args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())

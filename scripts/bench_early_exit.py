"""Benchmark: real early exit (``DVT.forward_early_exit``) against the FLOPs promise.

For each model and budget, thresholds are fitted on calibration batches (all exits run, the
paper's budget shares ``q_k ∝ (p / 20) ** k``); then, on other batches, running every exit
(``model(x)``) and the adaptive cascade are timed alternately, iteration by iteration, and
the best (shortest) time of each is kept: on a shared machine other processes only ever
add time. Reported per budget:

* the exit shares realised on the timed batches and the expected GFLOPs they imply;
* promised speed-up (FLOPs): full GFLOPs / expected GFLOPs at the realised shares;
* promised speed-up (stage times): the same with each exit's cost replaced by the measured
  per-image time of running the cascade up to it at the full batch, i.e. what early exit
  would give if stages cost the same per image at any batch size and gathering were free;
* measured speed-up: time of all exits / time of early exit, and measured / promised.

With ``--profile``, each stage is also timed alone on the samples that reach it (the batch
size it sees under early exit), which splits the gap into stage efficiency at small
batches and the cost of the cascade's own work (softmax, masks, gathers).

On a machine shared with other jobs, multi-threaded timings swing by several times from
call to call (threads wait on each other whenever one is descheduled); ``--threads 1``
then gives far steadier ratios.

Usage (from the repository root)::

    python scripts/bench_early_exit.py [--models DVT_T2t_vit_12 DVT_Deit_small] [--batch_size 64]
        [--budgets 10 25 40] [--iters 3] [--devices cpu cuda] [--threads N] [--profile]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark import machine_description  # noqa: E402

from models import DVT, build_dvt  # noqa: E402
from utils.budget.flops import exit_gflops  # noqa: E402
from utils.budget.thresholds import budget_exit_shares, find_thresholds  # noqa: E402

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stage_seconds(model: DVT, x: torch.Tensor, device: torch.device, num_exits: Optional[int] = None) -> list[float]:
    """Seconds spent in each stage while running the cascade on ``x`` up to ``num_exits``."""
    sync(device)
    times, start = [], time.perf_counter()
    for _ in model.iter_stages(x, num_exits):
        sync(device)
        now = time.perf_counter()
        times.append(now - start)
        start = now
    return times


def early_exit_seconds(model: DVT, x: torch.Tensor, thresholds: torch.Tensor,
                       device: torch.device) -> tuple[float, torch.Tensor]:
    """Seconds of one adaptive run and the exit index of every sample."""
    sync(device)
    start = time.perf_counter()
    out = model.forward_early_exit(x, thresholds)
    sync(device)
    return time.perf_counter() - start, out.exit_index.cpu()


class BudgetTiming(NamedTuple):
    p: int
    shares: list[float]
    expected_gflops: float
    flops_speedup: float
    time_model_speedup: float
    full_seconds: float
    early_seconds: float
    reach: list[int]  # samples (summed over batches) that run each stage
    isolated: list[float]  # seconds of each stage run alone on the samples reaching it (--profile)
    gather: float  # seconds of gathering the images and outputs of those samples (--profile)


class ModelTiming(NamedTuple):
    name: str
    flops: list[float]
    stage_seconds: list[float]  # per batch of all exits, best over iterations
    budgets: list[BudgetTiming]


@torch.no_grad()
def bench_model(name: str, device: torch.device, args: argparse.Namespace) -> ModelTiming:
    torch.manual_seed(args.seed)
    model = build_dvt(name, img_size=args.img_size).eval().requires_grad_(False)
    flops = exit_gflops(model, args.img_size)
    model.to(device)
    num_exits = model.num_exits
    gen = torch.Generator().manual_seed(args.seed)
    batch = (args.batch_size, 3, args.img_size, args.img_size)
    calib = [torch.randn(batch, generator=gen).to(device) for _ in range(args.calib_batches)]
    batches = [torch.randn(batch, generator=gen).to(device) for _ in range(args.batches)]
    amp = (torch.autocast(device.type, dtype=AMP_DTYPES[args.amp]) if args.amp else contextlib.nullcontext())

    with amp:
        # calibration doubles as warm-up of the all-exit path
        conf = torch.cat([torch.stack(model(x)).float().softmax(-1).amax(-1).cpu() for x in calib], dim=1)
        shares = torch.stack([budget_exit_shares(p, num_exits) for p in args.budgets])  # (P, E)
        thresholds = find_thresholds(conf, shares)  # (P, E)
        for _ in range(args.warmup):
            for x in batches:
                model(x)
                for t in thresholds:
                    model.forward_early_exit(x, t)

        full_runs: list[list[float]] = []  # per iteration, stage seconds summed over batches
        early_runs: list[list[float]] = []  # per iteration, seconds per budget
        exits: list[list[torch.Tensor]] = [[] for _ in thresholds]  # per budget, per batch
        for it in range(args.iters):
            stages = [0.0] * num_exits
            early = [0.0] * len(thresholds)
            for x in batches:
                for k, s in enumerate(stage_seconds(model, x, device)):
                    stages[k] += s
                for j, t in enumerate(thresholds):
                    s, exit_index = early_exit_seconds(model, x, t, device)
                    early[j] += s
                    if it == 0:
                        exits[j].append(exit_index)
            full_runs.append(stages)
            early_runs.append(early)

        stage_best = [min(run[k] for run in full_runs) for k in range(num_exits)]
        full_best = min(sum(run) for run in full_runs)
        cumulative = [sum(stage_best[:k + 1]) for k in range(num_exits)]
        results = []
        for j, p in enumerate(args.budgets):
            exit_index = torch.cat(exits[j])
            n = exit_index.numel()
            counts = torch.bincount(exit_index, minlength=num_exits).tolist()
            share = [c / n for c in counts]
            expected = sum(s * f for s, f in zip(share, flops))
            time_model = cumulative[-1] / sum(s * c for s, c in zip(share, cumulative))
            reach = [sum(counts[k:]) for k in range(num_exits)]
            isolated, gather = profile_stages(model, batches, exit_index, device, args.iters) if args.profile \
                else ([], 0.0)
            results.append(BudgetTiming(
                p, share, expected, flops[-1] / expected, time_model, full_best,
                min(run[j] for run in early_runs), reach, isolated, gather))
    del model
    return ModelTiming(name, flops, stage_best, results)


def profile_stages(model: DVT, batches: Sequence[torch.Tensor], exit_index: torch.Tensor, device: torch.device,
                   iters: int) -> tuple[list[float], float]:
    """Split an early-exit run into its parts, summed over batches (best of ``iters``).

    Returns the seconds of each stage run alone on the samples that reach it (fed with the
    previous stage's outputs for those samples, as the cascade does), and the seconds of
    gathering those images and outputs.
    """
    num_exits = model.num_exits
    per_batch = exit_index.split([x.shape[0] for x in batches])
    stage_runs, gather_runs = [], []
    for _ in range(iters):
        stages, gather = [0.0] * num_exits, 0.0
        for x, exits in zip(batches, per_batch):
            outputs = list(model.iter_stages(x))
            for k, stage in enumerate(model.stages):
                keep = (exits.to(x.device) >= k).nonzero().flatten()
                if not keep.numel():
                    continue
                export = k + 1 < num_exits and model.stages[k + 1].relation_reuse
                sync(device)
                start = time.perf_counter()
                x_k = x[keep]
                prev = outputs[k - 1].select(keep) if k else None
                sync(device)
                middle = time.perf_counter()
                stage(x_k, prev, export_relations=export)
                sync(device)
                gather += middle - start
                stages[k] += time.perf_counter() - middle
        stage_runs.append(stages)
        gather_runs.append(gather)
    return [min(r[k] for r in stage_runs) for k in range(num_exits)], min(gather_runs)


def load_line() -> str:
    try:
        return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "load average unknown"


def fmt(values: Sequence[float], digits: int = 2) -> str:
    return " / ".join(f"{v:.{digits}f}" for v in values)


def print_tables(device: torch.device, timings: Sequence[ModelTiming], args: argparse.Namespace) -> None:
    n = args.batch_size * args.batches
    print(f"\n### {device.type}, batch {args.batch_size} x {args.batches}, best of {args.iters} iterations"
          f"{', autocast ' + args.amp if args.amp else ''}\n")
    print("| model | p | exit shares | exp. GFLOPs | all exits img/s | early exit img/s | promised (FLOPs) "
          "| promised (stage times) | measured | measured / promised |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m in timings:
        for b in m.budgets:
            measured = b.full_seconds / b.early_seconds
            print(f"| {m.name} | {b.p} | {fmt(b.shares)} | {b.expected_gflops:.2f} | {n / b.full_seconds:.1f} "
                  f"| {n / b.early_seconds:.1f} | {b.flops_speedup:.2f}x | {b.time_model_speedup:.2f}x "
                  f"| {measured:.2f}x | {measured / b.flops_speedup:.2f} |")
    print()
    for m in timings:
        total = sum(m.stage_seconds)
        cumulative = [sum(m.stage_seconds[:k + 1]) / total for k in range(len(m.stage_seconds))]
        print(f"- {m.name}: all exits, seconds per batch in each stage {fmt(m.stage_seconds)}; cumulative time "
              f"shares {fmt(cumulative)} vs FLOPs shares {fmt([f / m.flops[-1] for f in m.flops])} "
              f"(cumulative GFLOPs {fmt(m.flops)})")
    if not args.profile:
        return
    print("\n| model | p | samples reaching each stage | stage s alone (at that size) "
          "| stage s scaled from full batch | stage efficiency | gather s | early exit s | rest |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in timings:
        for b in m.budgets:
            scaled = [s * r / n for s, r in zip(m.stage_seconds, b.reach)]
            efficiency = [sc / s if s > 0 else float("nan") for sc, s in zip(scaled, b.isolated)]
            rest = b.early_seconds - sum(b.isolated) - b.gather
            print(f"| {m.name} | {b.p} | {' / '.join(map(str, b.reach))} | {fmt(b.isolated)} | {fmt(scaled)} "
                  f"| {fmt(efficiency)} | {b.gather:.3f} | {b.early_seconds:.2f} | {rest:+.2f} |")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["DVT_T2t_vit_12", "DVT_Deit_small"])
    parser.add_argument("--budgets", nargs="+", type=int, default=[10, 25, 40],
                        help="budget indices p (exit shares ∝ (p/20)**k)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=1, help="timed batches per iteration")
    parser.add_argument("--calib_batches", type=int, default=1, help="batches the thresholds are fitted on")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations (the best is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--img_size", type=int, default=224)
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when available")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads (default: cores)")
    parser.add_argument("--amp", choices=tuple(AMP_DTYPES), default=None, help="autocast dtype")
    parser.add_argument("--profile", action="store_true",
                        help="also time each stage alone at the batch size it sees under early exit")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])

    print("command: python " + " ".join([os.path.relpath(__file__)] + list(argv if argv is not None else sys.argv[1:])))
    print(f"{load_line()} at start")
    for name in devices:
        device = torch.device(name)
        print(f"machine: {machine_description(device)}")
        timings = [bench_model(model, device, args) for model in args.models]
        print_tables(device, timings, args)
    print(f"\n{load_line()} at end (the machine is shared: other processes compete for the cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

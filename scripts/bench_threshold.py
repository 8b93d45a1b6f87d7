"""Benchmark: the original per-sample threshold search vs the vectorised one in utils.budget.

Both run evaluation mode 2 on synthetic softmax outputs: fit thresholds for the 59
budgets on a calibration set, then evaluate them on a validation set (50,000 samples,
3 exits, 1000 classes each by default). The per-sample loop follows the original
algorithm step by step on the full softmax tensors; it takes minutes, so it is timed on
``--loop-budgets`` budgets spread over 1..59 and extrapolated linearly to all 59. On
those budgets both methods must give identical thresholds and the same numbers. The original
signatures (``from utils import dynamic_find_threshold, dynamic_evaluate``) are also timed as
the original inference code calls them, once per budget on the same tensors, and must match the
batched curve on all budgets.

Usage (from the repository root)::

    python scripts/bench_threshold.py [--samples 50000] [--classes 1000] [--loop-budgets 20] [--threads 1]
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.budget import original_api  # noqa: E402
from utils.budget.original_api import dynamic_evaluate, dynamic_find_threshold  # noqa: E402
from utils.budget.stats import exit_stats  # noqa: E402
from utils.budget.thresholds import DEFAULT_BUDGETS, budget_curve, budget_exit_shares  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import machine_description  # noqa: E402

FLOPS = [0.47, 1.46, 3.50]  # cumulative GFLOPs of DVT T2T-ViT-12's exits


def synthetic_softmax(seed: int, num_exits: int, n: int, classes: int) -> tuple[Tensor, Tensor]:
    """Softmax outputs ``(E, N, C)`` float32 and targets ``(N,)``; later exits are right more often."""
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, classes, (n,), generator=gen)
    difficulty = torch.rand(n, generator=gen)
    probs = torch.empty(num_exits, n, classes)
    rows = torch.arange(n)
    for k in range(num_exits):
        logits = torch.randn(n, classes, generator=gen)  # (N, C)
        logits[rows, targets] += 6.0 * (k + 1) / num_exits * (1.2 - difficulty) + torch.randn(n, generator=gen)
        probs[k] = torch.softmax(logits, dim=-1)
    return probs, targets


# ------------------------------------------------ per-sample loop, as the original works

def loop_find_threshold(probs: Tensor, shares: Tensor) -> Tensor:
    """Walk each exit's samples by descending confidence, skipping those already gone."""
    num_exits, n, _ = probs.shape
    confidence, _ = probs.max(dim=2)  # (E, N)
    _, order = confidence.sort(dim=1, descending=True)
    gone = torch.zeros(n)
    thresholds = torch.full((num_exits,), 1e8)
    for k in range(num_exits - 1):
        wanted = math.floor(n * shares[k])
        seen = 0
        for i in range(n):
            sample = order[k][i]
            if gone[sample] == 0:
                seen += 1
                if seen == wanted:
                    thresholds[k] = confidence[k][sample]
                    break
        gone += (confidence[k] >= thresholds[k]).float()
    thresholds[-1] = -1e8
    return thresholds


def loop_evaluate(probs: Tensor, targets: Tensor, flops: list[float], thresholds: Tensor) -> tuple[float, float]:
    """Send every sample to its first exit over threshold; count hits and leavers."""
    num_exits, n, _ = probs.shape
    confidence, prediction = probs.max(dim=2)  # (E, N)
    hits, leavers = 0, torch.zeros(num_exits)
    for i in range(n):
        for k in range(num_exits):
            if confidence[k][i].item() >= thresholds[k]:
                hits += int(prediction[k][i].item() == targets[i].item())
                leavers[k] += 1
                break
    expected = 0
    for k in range(num_exits):
        expected = expected + leavers[k] / n * flops[k]
    return hits * 100.0 / n, float(expected)


def spread(budgets: range, count: int) -> list[int]:
    """``count`` budget indices spread evenly over ``budgets`` (ends included)."""
    if count >= len(budgets):
        return list(budgets)
    if count == 1:
        return [budgets[len(budgets) // 2]]
    return sorted({budgets[round(i * (len(budgets) - 1) / (count - 1))] for i in range(count)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=50_000, help="samples per set (calibration and validation)")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--exits", type=int, default=3)
    parser.add_argument("--loop-budgets", type=int, default=20,
                        help="budgets on which the per-sample loop is timed (extrapolated to 59)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of the vectorised method (best kept)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.exits != len(FLOPS):
        FLOPS[:] = [FLOPS[-1] * (k + 1) / args.exits for k in range(args.exits)]

    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {machine_description(torch.device('cpu'))}, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}, {platform.platform()}, "
          f"load average at start {' / '.join(f'{x:.2f}' for x in os.getloadavg())}")

    shape = (args.exits, args.samples, args.classes)
    print(f"data: calibration and validation softmax, each {shape} float32, flops {FLOPS}")
    calib_probs, calib_targets = synthetic_softmax(0, *shape)
    val_probs, val_targets = synthetic_softmax(1, *shape)
    budgets = DEFAULT_BUDGETS

    # vectorised: compact stats once, then all 59 budgets at once
    best_total, best_curve = math.inf, math.inf
    for _ in range(args.repeats):
        start = time.perf_counter()
        calib_conf, _ = exit_stats(calib_probs, calib_targets)
        val_conf, val_correct = exit_stats(val_probs, val_targets)
        mid = time.perf_counter()
        thresholds, (gflops, top1) = budget_curve(val_conf, val_correct, FLOPS, calib_conf=calib_conf,
                                                  budgets=budgets)
        stop = time.perf_counter()
        best_total, best_curve = min(best_total, stop - start), min(best_curve, stop - mid)

    # the original signatures, called once per budget on the same tensors (the original's pattern)
    best_api = math.inf
    for _ in range(args.repeats):
        original_api._search_stats.clear()
        original_api._eval_stats.clear()
        start = time.perf_counter()
        api_rows = []
        for p in budgets:
            api_thresholds = dynamic_find_threshold(calib_probs, calib_targets, budget_exit_shares(p, args.exits))
            api_rows.append((api_thresholds.tolist(), *dynamic_evaluate(val_probs, val_targets, FLOPS, api_thresholds)))
        best_api = min(best_api, time.perf_counter() - start)
    api_agree = api_rows == [(t, a, g) for t, a, g in zip(thresholds.tolist(), top1, gflops)]

    # per-sample loop on a few budgets
    timed = spread(budgets, args.loop_budgets)
    loop_seconds = 0.0
    agree = True
    for p in timed:
        start = time.perf_counter()
        loop_thresholds = loop_find_threshold(calib_probs, budget_exit_shares(p, args.exits))
        loop_top1, loop_gflops = loop_evaluate(val_probs, val_targets, FLOPS, loop_thresholds)
        loop_seconds += time.perf_counter() - start
        row = budgets.index(p)
        agree &= loop_thresholds.tolist() == thresholds[row].tolist()
        agree &= abs(loop_top1 - top1[row]) <= 1e-9 and abs(loop_gflops - gflops[row]) <= 1e-6
    loop_total = loop_seconds / len(timed) * len(budgets)

    print()
    print(f"| method ({len(budgets)} budgets: search on calibration + evaluation on validation) "
          f"| seconds | speed-up |")
    print("|---|---:|---:|")
    print(f"| per-sample loop, original algorithm (timed on {len(timed)} budgets {timed}, "
          f"{loop_seconds:.1f} s, extrapolated linearly to {len(budgets)}) | {loop_total:.1f} | 1x |")
    print(f"| utils.budget: exit_stats from softmax + budget_curve | {best_total:.3f} "
          f"| {loop_total / best_total:,.0f}x |")
    print(f"| utils.budget: budget_curve from compact stats | {best_curve:.3f} "
          f"| {loop_total / best_curve:,.0f}x |")
    print(f"| `from utils import dynamic_find_threshold, dynamic_evaluate`, called once per budget "
          f"| {best_api:.3f} | {loop_total / best_api:,.0f}x |")
    print()
    full_bytes = calib_probs.numel() * calib_probs.element_size()
    stats_bytes = val_conf.numel() * val_conf.element_size() + val_correct.numel() * val_correct.element_size()
    print(f"memory per set: full softmax (E, N, C) float32 = {full_bytes / 2**20:,.1f} MiB (what the original keeps); "
          f"compact stats (E, N) float32 confidence + bool correct = {stats_bytes / 2**20:,.2f} MiB "
          f"({full_bytes / stats_bytes:,.0f}x smaller)")
    print(f"loop and vectorised results on the timed budgets: {'identical' if agree else 'DIFFERENT'}")
    print(f"original signatures per budget and budget_curve, all budgets: {'identical' if api_agree else 'DIFFERENT'}")
    print(f"curve (vectorised): GFLOPs {gflops[0]:.3f}..{gflops[-1]:.3f}, top-1 {top1[0]:.2f}..{top1[-1]:.2f} %")
    if not (agree and api_agree):
        sys.exit(1)


if __name__ == "__main__":
    main()

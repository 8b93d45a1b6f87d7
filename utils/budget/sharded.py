"""The evaluation loop of :mod:`utils.budget.stats` over one process's share of a dataset, its
per-sample statistics put back in dataset order on every process.

Each process runs the batches :class:`utils.data.loader.BatchShardSampler` deals it: the very
batches a one-process run makes, so every number per sample is the one that run computes, and
the accuracies, thresholds and budget tables made from them are identical to the last bit.
Alone, these are :func:`~utils.budget.stats.collect_exit_stats` and
:func:`~utils.budget.stats.validation_run` over the whole dataset.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ..run.distributed import DistEnv, all_gather_objects, gather_in_order
from .stats import EarlyExitRun, ValRun, collect_exit_stats, validation_run


def shard_of(loader: DataLoader) -> tuple[Tensor, int]:
    """The dataset positions of the loader's samples (its sampler's ``index()``, or all of them
    in order) and the dataset's size."""
    size = len(loader.dataset)
    index = getattr(loader.sampler, "index", None)
    return (index() if callable(index) else torch.arange(size)), size


def sharded_exit_stats(model: torch.nn.Module, loader: DataLoader, num_exits: int, env: DistEnv,
                       amp_dtype: Optional[torch.dtype] = None, desc: Optional[str] = None,
                       progress: bool = True) -> tuple[Tensor, Tensor]:
    """Confidence and correctness ``(E, N)`` of every exit over the whole dataset, in dataset
    order, on every process; this process runs the batches of ``loader`` (its share)."""
    index, size = shard_of(loader)
    if len(index):
        stats = collect_exit_stats(model, loader, env.device, amp_dtype, desc=desc, progress=progress)
    else:
        stats = torch.empty(num_exits, 0), torch.empty(num_exits, 0, dtype=torch.bool)
    confidence, correct = gather_in_order(index, stats, size)
    return confidence, correct


def _empty_run(num_exits: int, num_early: int) -> ValRun:
    none = torch.empty(0, dtype=torch.long)
    early = [EarlyExitRun(none, none, torch.empty(0), none, 0.0) for _ in range(num_early)]
    return ValRun(torch.empty(num_exits, 0), torch.empty(num_exits, 0, dtype=torch.bool),
                  torch.empty(num_exits, 0, dtype=torch.long), none, 0.0, early)


def sharded_validation_run(model: torch.nn.Module, loader: DataLoader, num_exits: int, env: DistEnv,
                           amp_dtype: Optional[torch.dtype], early_thresholds: Sequence[Tensor] = (),
                           progress: bool = True, queued: bool = False) -> ValRun:
    """:func:`~utils.budget.stats.validation_run` over the whole dataset, in dataset order, on
    every process (``queued``: each process's adaptive runs as one stream over its batches). The
    model times are the slowest process's: the time the processes took side by side."""
    index, size = shard_of(loader)
    if len(index):
        run = validation_run(model, loader, env.device, amp_dtype, early_thresholds, progress, queued)
    else:
        run = _empty_run(num_exits, len(early_thresholds))
    if not env.distributed:
        return run
    per_sample = [run.confidence, run.correct, run.prediction, run.targets]
    for early in run.early:
        per_sample += [early.exit_index, early.prediction, early.confidence, early.targets]
    full = gather_in_order(index, per_sample, size)
    seconds = [max(t) for t in zip(*all_gather_objects([run.seconds] + [e.seconds for e in run.early]))]
    early = [EarlyExitRun(*full[4 + 4 * k: 8 + 4 * k], seconds[1 + k]) for k in range(len(run.early))]
    return ValRun(*full[:4], seconds[0], early)

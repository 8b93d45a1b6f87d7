"""The released checkpoint format: its contents (weights in the original layout, per-exit
GFLOPs and accuracies, thresholds of the 59 budgets, the budget curve) and its export from a
trained model."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from ..budget.flops import exit_gflops
from ..budget.stats import anytime_accuracy, collect_exit_stats
from ..budget.thresholds import DEFAULT_BUDGETS, budget_curve
from ..data.loader import ShardSampler, make_loader
from ..run.distributed import DistEnv, all_gather_objects, barrier
from .files import atomic_save
from .weights import unwrap_model


def released_checkpoint(
        model: torch.nn.Module,
        flops: Sequence[float],
        val_stats: tuple[torch.Tensor, torch.Tensor],
        calib_stats: tuple[torch.Tensor, torch.Tensor],
        budgets: Sequence[int] = DEFAULT_BUDGETS,
        extra: Optional[dict] = None,
) -> dict:
    """The checkpoint layout of the released DVT models.

    ``model_state_dict`` (the original key layout for three-exit cascades, so the original
    evaluation code reads it too), ``flops``, ``anytime_classification`` on the validation
    set, ``dynamic_threshold`` (budgets x exits, searched on the calibration set) and
    ``budgeted_batch_classification`` ([GFLOPs list, top-1 % list] on the validation set).
    ``model_name`` and ``model_kwargs`` let the model be rebuilt from the file alone.
    """
    from models.dvt import to_original_state_dict

    plain = unwrap_model(model)
    state_dict = {k: v.detach().cpu() for k, v in plain.state_dict().items()}
    if len(plain.stages) == 3:
        state_dict = to_original_state_dict(state_dict)
    val_conf, val_correct = val_stats
    thresholds, curve = budget_curve(val_conf, val_correct, flops, calib_conf=calib_stats[0], budgets=budgets)
    checkpoint = {
        "model_state_dict": state_dict,
        "flops": [float(f) for f in flops],
        "anytime_classification": anytime_accuracy(val_correct),
        "dynamic_threshold": thresholds,
        "budgeted_batch_classification": curve,
        "model_name": getattr(plain, "model_name", None),
        "model_kwargs": dict(getattr(plain, "model_kwargs", {})),
    }
    checkpoint.update(extra or {})
    return checkpoint


def sharded_exit_stats(model: nn.Module, dataset: Dataset, env: DistEnv, batch_size: int, workers: int,
                       amp_dtype: Optional[torch.dtype] = None, progress: bool = False,
                       desc: str = "stats") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample confidence and correctness (E, N) of every exit over ``dataset``, in dataset
    order: each rank runs its shard, rank 0 receives all of them."""
    sampler = ShardSampler(len(dataset), env.world_size, env.rank)
    loader = make_loader(dataset, sampler, batch_size, workers, env, persistent=False)
    if len(sampler):
        conf, correct = collect_exit_stats(model, loader, env.device, amp_dtype, desc=desc, progress=progress)
    else:
        E = unwrap_model(model).num_exits
        conf, correct = torch.empty(E, 0), torch.empty(E, 0, dtype=torch.bool)
    parts = all_gather_objects((conf, correct))
    if len(parts) == 1:
        return conf, correct
    E = conf.shape[0]
    full_conf = torch.empty(E, len(dataset))
    full_correct = torch.empty(E, len(dataset), dtype=torch.bool)
    for r, (c, k) in enumerate(parts):
        full_conf[:, r::env.world_size] = c
        full_correct[:, r::env.world_size] = k
    return full_conf, full_correct


def export_released(
        model: nn.Module,
        val_set: Dataset,
        calib_set: Dataset,
        env: DistEnv,
        path: Path,
        batch_size: int,
        workers: int,
        progress: bool = False,
        extra: Optional[dict] = None,
) -> Optional[dict]:
    """Write the released ``.pth.tar`` layout (see :func:`released_checkpoint`):
    per-exit GFLOPs of the model at its image size, top-1 of each exit on ``val_set``,
    thresholds for the 59 budgets fitted on ``calib_set`` and the budget curve on ``val_set``.
    The statistics are computed in float32 whatever the training precision: the thresholds are
    confidences of particular samples, and inference.py evaluates in float32 by default.
    Every rank must call this; rank 0 writes and returns the checkpoint."""
    plain = unwrap_model(model)
    val_stats = sharded_exit_stats(plain, val_set, env, batch_size, workers, None, progress, "release: val")
    calib_stats = sharded_exit_stats(plain, calib_set, env, batch_size, workers, None, progress,
                                     "release: calibration")
    checkpoint = None
    if env.is_main:
        flops = exit_gflops(plain, plain.img_size)
        checkpoint = released_checkpoint(plain, flops, val_stats, calib_stats, extra=extra)
        atomic_save(checkpoint, path)
    barrier()
    return checkpoint

"""The released checkpoint format: its contents (weights in the original layout, per-exit
GFLOPs and accuracies, thresholds of the 59 budgets, the budget curve) and its export from a
trained model, or from the model of any checkpoint (:func:`model_for_checkpoint`)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from ..budget.flops import exit_gflops
from ..budget.stats import anytime_accuracy, collect_exit_stats
from ..budget.thresholds import DEFAULT_BUDGETS, budget_curve
from ..data.loader import ShardSampler, make_loader
from ..errors import CheckpointError
from ..run.distributed import DistEnv, all_gather_objects, barrier
from .files import atomic_save
from .hub import save_model_folder
from .weights import build_from_checkpoint, unwrap_model

RESULT_KEYS = ("flops", "anytime_classification", "budgeted_batch_classification")


def require_entries(checkpoint: dict, keys: Sequence[str], source: str, purpose: str) -> None:
    """Stop with a message naming what ``checkpoint`` lacks of ``keys`` and what it holds (its
    entries; the tensors of a state dict counted, with the first few named)."""
    missing = [k for k in keys if k not in checkpoint]
    if missing:
        raise CheckpointError(f"{source} has no {', '.join(repr(k) for k in missing)} entry, needed {purpose} "
                              f"(it holds: {describe_entries(checkpoint)})")


def describe_entries(checkpoint: dict, named: int = 3) -> str:
    """``checkpoint``'s entries for a message: its other entries by name, its tensors (a state
    dict's weights: hundreds of names) as a count and the first ``named`` of them."""
    tensors = [str(k) for k, v in checkpoint.items() if torch.is_tensor(v)]
    parts = [str(k) for k, v in checkpoint.items() if not torch.is_tensor(v)]
    if len(tensors) > named:
        parts.append(f"{len(tensors)} tensors ({', '.join(tensors[:named])}, ...)")
    else:
        parts += tensors
    return ", ".join(parts) or "nothing"


def result_entries(model: nn.Module, flops: Sequence[float], anytime: Sequence[float], thresholds: torch.Tensor,
                   curve: Sequence[Sequence[float]]) -> dict:
    """The evaluation results of the released layout (``flops``, ``anytime_classification``,
    ``dynamic_threshold``, ``budgeted_batch_classification``), with ``model_name`` and
    ``model_kwargs`` so that the model can be rebuilt from the file alone."""
    return {
        "flops": [float(f) for f in flops],
        "anytime_classification": anytime,
        "dynamic_threshold": thresholds.clone(),
        "budgeted_batch_classification": curve,
        "model_name": getattr(model, "model_name", None),
        "model_kwargs": dict(getattr(model, "model_kwargs", {})),
    }


def save_with_results(checkpoint: dict, path: str | Path, model: nn.Module, flops: Sequence[float],
                      anytime: Sequence[float], thresholds: torch.Tensor, curve: Sequence[Sequence[float]]) -> None:
    """Write ``checkpoint`` to ``path`` with new evaluation results (:func:`result_entries`)
    in place of its own."""
    atomic_save({**checkpoint, **result_entries(model, flops, anytime, thresholds, curve)}, path)


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
    checkpoint = {"model_state_dict": state_dict,
                  **result_entries(plain, flops, anytime_accuracy(val_correct), thresholds, curve)}
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


def model_folder_beside(path: Path) -> Path:
    """The model folder (config.json + model.safetensors) written next to a released file:
    ``released.pth.tar`` -> ``released/``."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".tar").removesuffix(".pth") or path.name + ".d")


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
    The same model and results go to a model folder beside it (:func:`model_folder_beside`).
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
        save_model_folder(plain, checkpoint, model_folder_beside(path), overwrite=True)
    barrier()
    return checkpoint


def model_for_checkpoint(args: argparse.Namespace, checkpoint: dict, source: str,
                         device: torch.device) -> tuple[nn.Module, str]:
    """The checkpoint's model (its own when it names one, else --model built from the
    options) with the weights --release-weights picks, on ``device``; and which weights."""
    model, which = build_from_checkpoint(
        checkpoint, source, default_name=args.model, weights=args.release_weights,
        defaults=dict(img_size=args.img_size, feature_reuse=args.feature_reuse, relation_reuse=args.relation_reuse))
    return model.to(device), which

"""Evaluation engine: per-exit statistics over a dataset, and released-format checkpoints."""
from __future__ import annotations

import contextlib
from typing import Iterable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from .budget import DEFAULT_BUDGETS, ExitStatsAccumulator, anytime_accuracy, budget_curve
from .checkpoint import unwrap_model


def autocast_context(device: torch.device, amp_dtype: Optional[torch.dtype]):
    """``torch.autocast`` for the device, or nothing when ``amp_dtype`` is None."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=amp_dtype)


@torch.no_grad()
def collect_exit_stats(
        model: torch.nn.Module,
        loader: Iterable,
        device: torch.device | str = "cpu",
        amp_dtype: Optional[torch.dtype] = None,
        desc: Optional[str] = None,
        progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run every exit over ``loader`` and keep, per sample and exit, only the confidence
    (max softmax probability) and whether the prediction is right.

    Returns:
        confidence (E, N) float32 and correct (E, N) bool, on the CPU, in loader order.
    """
    model.eval()
    acc = ExitStatsAccumulator()
    for images, targets in tqdm(loader, desc=desc, disable=not progress, leave=False):
        images = images.to(device, non_blocking=True)
        with autocast_context(device, amp_dtype):
            logits = model(images)
        acc.update(logits, targets.to(device))
    return acc.result()


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

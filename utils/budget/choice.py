"""Which confidence thresholds to classify with, from what a checkpoint stores.

Checkpoints in the released layout hold ``dynamic_threshold`` (one row of thresholds per
budget, P x exits) and ``budgeted_batch_classification`` ([expected GFLOPs per row, top-1 %
per row], measured on the validation set when the checkpoint was evaluated). The choice, in
order of precedence:

1. explicit thresholds (one per exit, or one fewer: the last exit takes every image left);
2. a budget in GFLOPs: the most accurate stored row whose expected cost is within it (the
   cheaper of equally accurate rows);
3. a row number P (1-based, as the original's budgets p = 1..59);
4. by default, the cheapest stored row whose expected top-1 is within
   :data:`DEFAULT_TOLERANCE` points of the best stored row's; without a stored table, every
   image runs to the last exit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch

from ..errors import CheckpointError, ConfigError
from .thresholds import FINAL_THRESHOLD, NO_EXIT_THRESHOLD

DEFAULT_TOLERANCE = 0.5  # top-1 points
NEVER = NO_EXIT_THRESHOLD  # a threshold no softmax probability reaches
ALWAYS = FINAL_THRESHOLD  # the last exit's threshold: every image left exits there


def as_plain(value: Any) -> Any:
    """Tensors, numpy values and nested lists, tuples and mappings of them as Python numbers,
    lists and dicts with string keys (printable, JSON-serialisable, ``ast.literal_eval``-readable);
    Python numbers are kept as they are."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().tolist()
    elif hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [as_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): as_plain(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class ThresholdChoice:
    """Thresholds to classify with and where they come from.

    Attributes:
        thresholds: one per exit; the last is :data:`ALWAYS`.
        source: ``"thresholds"``, ``"budget"``, ``"budget_index"``, ``"default"`` or ``"last exit"``.
        row: 1-based row of the checkpoint's ``dynamic_threshold``, when one was chosen.
        rows: how many rows the checkpoint stores.
        expected_gflops, expected_top1: the checkpoint's figures for that row.
        budget: the GFLOPs asked for.
    """
    thresholds: tuple[float, ...]
    source: str
    row: Optional[int] = None
    rows: int = 0
    expected_gflops: Optional[float] = None
    expected_top1: Optional[float] = None
    budget: Optional[float] = None

    def describe(self) -> str:
        """One line saying which thresholds are used and why."""
        values = "[" + ", ".join(f"{t:.6g}" for t in self.thresholds) + "]"
        if self.row is None:
            why = ("given with --thresholds" if self.source == "thresholds" else
                   "none stored in the checkpoint, so every image runs to the last exit")
            return f"thresholds {values}: {why}"
        if self.source == "budget":
            why = f"the most accurate stored row within {self.budget:g} GFLOPs"
        elif self.source == "default":
            why = f"the default: the cheapest stored row within {DEFAULT_TOLERANCE:g} points of the best stored top-1"
        else:
            why = "the row asked for"
        expected = ""
        if self.expected_gflops is not None and self.expected_top1 is not None:
            expected = (f"; the checkpoint expects {self.expected_top1:.2f}% top-1 at "
                        f"{self.expected_gflops:.4g} GFLOPs/image")
        return f"thresholds {values}: row {self.row} of the checkpoint's {self.rows} ({why}){expected}"


def full_thresholds(values: Sequence[float], num_exits: int) -> tuple[float, ...]:
    """One threshold per exit from ``num_exits`` or ``num_exits - 1`` values; the last exit's
    is :data:`ALWAYS` (it takes every image left, whatever its value)."""
    values = [float(v) for v in values]
    if len(values) not in (num_exits - 1, num_exits):
        raise ConfigError(f"the model has {num_exits} exits: give {num_exits - 1} thresholds "
                          f"(or {num_exits}, the last being ignored), got {len(values)}")
    return tuple(values[:num_exits - 1]) + (ALWAYS,)


def stored_thresholds(checkpoint: dict, num_exits: int, source: str,
                      dtype: torch.dtype = torch.float64) -> Optional[torch.Tensor]:
    """The checkpoint's ``dynamic_threshold``, one row of ``num_exits`` thresholds per budget
    (P, E), or None when it stores none.

    Args:
        checkpoint: the loaded checkpoint dictionary.
        num_exits: exits of its model.
        source: the checkpoint's file name, for messages.
        dtype: of the returned tensor.
    """
    rows = checkpoint.get("dynamic_threshold")
    if rows is None:
        return None
    rows = torch.as_tensor(as_plain(rows), dtype=dtype)
    if rows.dim() != 2 or rows.shape[1] != num_exits or rows.shape[0] == 0:
        raise CheckpointError(f"{source}: 'dynamic_threshold' must be (budgets, {num_exits}), "
                              f"got shape {tuple(rows.shape)}")
    return rows


def stored_table(checkpoint: dict, num_exits: int, source: str
                 ) -> tuple[Optional[torch.Tensor], Optional[list[float]], Optional[list[float]]]:
    """The checkpoint's thresholds (P, E) and per-row expected GFLOPs and top-1 (each None
    when absent), checked for shape."""
    rows = stored_thresholds(checkpoint, num_exits, source)
    if rows is None:
        return None, None, None
    curve = checkpoint.get("budgeted_batch_classification")
    if curve is None:
        return rows, None, None
    curve = as_plain(curve)
    if not (isinstance(curve, list) and len(curve) == 2 and all(isinstance(c, list) for c in curve)
            and len(curve[0]) == len(curve[1]) == rows.shape[0]):
        raise CheckpointError(f"{source}: 'budgeted_batch_classification' must be [GFLOPs, top-1] lists of "
                              f"{rows.shape[0]} values, one per 'dynamic_threshold' row")
    return rows, [float(v) for v in curve[0]], [float(v) for v in curve[1]]


def _row_choice(rows: torch.Tensor, index: int, source: str, gflops: Optional[list[float]],
                top1: Optional[list[float]], budget: Optional[float] = None) -> ThresholdChoice:
    values = rows[index].tolist()
    return ThresholdChoice(
        thresholds=tuple(values[:-1]) + (ALWAYS,), source=source, row=index + 1, rows=rows.shape[0],
        expected_gflops=None if gflops is None else gflops[index],
        expected_top1=None if top1 is None else top1[index], budget=budget)


def best_row_within(gflops: Sequence[float], top1: Sequence[float], budget: float) -> Optional[int]:
    """0-based index of the most accurate row whose cost is within ``budget`` (ties: the
    cheaper, then the earlier), or None when no row fits."""
    fits = [i for i, cost in enumerate(gflops) if cost <= budget]
    return min(fits, key=lambda i: (-top1[i], gflops[i], i)) if fits else None


def cheapest_row_reaching(gflops: Sequence[float], top1: Sequence[float], target: float) -> Optional[int]:
    """0-based index of the cheapest row whose top-1 reaches ``target`` (ties: the more accurate,
    then the earlier), or None when no row does."""
    reach = [i for i, acc in enumerate(top1) if acc >= target]
    return min(reach, key=lambda i: (gflops[i], -top1[i], i)) if reach else None


def default_row(gflops: Sequence[float], top1: Sequence[float], tolerance: float = DEFAULT_TOLERANCE) -> int:
    """0-based index of the cheapest row within ``tolerance`` points of the best top-1."""
    best = max(top1)
    near = [i for i, acc in enumerate(top1) if acc >= best - tolerance]
    return min(near, key=lambda i: (gflops[i], -top1[i], i))


def choose_thresholds(
        checkpoint: dict,
        num_exits: int,
        thresholds: Optional[Sequence[float]] = None,
        budget: Optional[float] = None,
        budget_index: Optional[int] = None,
        source: str = "checkpoint",
) -> ThresholdChoice:
    """The thresholds to use (see the module docstring for the order of precedence).

    Args:
        checkpoint: the loaded checkpoint dictionary.
        num_exits: exits of its model.
        thresholds: explicit thresholds.
        budget: average GFLOPs per image.
        budget_index: 1-based row of the stored thresholds.
        source: the checkpoint's file name, for messages.
    """
    if thresholds is not None:
        return ThresholdChoice(full_thresholds(thresholds, num_exits), "thresholds")
    rows, gflops, top1 = stored_table(checkpoint, num_exits, source)
    if budget is not None:
        if rows is None or gflops is None:
            missing = "dynamic_threshold" if rows is None else "budgeted_batch_classification"
            raise CheckpointError(f"{source} has no {missing!r} entry, needed to choose thresholds for a budget; "
                                  "give --thresholds, or a checkpoint evaluated by inference.py --save_checkpoint")
        index = best_row_within(gflops, top1, budget)
        if index is None:
            cheapest = min(range(len(gflops)), key=gflops.__getitem__)
            raise ConfigError(f"budget {budget:g} GFLOPs is below every stored row (the cheapest, row {cheapest + 1}, "
                              f"expects {gflops[cheapest]:.4g} GFLOPs/image)")
        return _row_choice(rows, index, "budget", gflops, top1, budget)
    if budget_index is not None:
        if rows is None:
            raise CheckpointError(f"{source} has no 'dynamic_threshold' entry, needed by a budget index")
        if not 1 <= budget_index <= rows.shape[0]:
            raise ConfigError(f"budget index {budget_index}: the checkpoint stores rows 1 to {rows.shape[0]}")
        return _row_choice(rows, budget_index - 1, "budget_index", gflops, top1)
    if rows is None or gflops is None:
        return ThresholdChoice((NEVER,) * (num_exits - 1) + (ALWAYS,), "last exit")
    return _row_choice(rows, default_row(gflops, top1), "default", gflops, top1)

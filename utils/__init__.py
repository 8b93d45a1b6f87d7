"""Evaluation, budgets, FLOPs, data and checkpoint helpers.

``from utils import dynamic_find_threshold, dynamic_evaluate`` keeps the original
evaluation functions' names and semantics (vectorised, with the per-tensor statistics kept
between calls: utils/original_api.py).
"""
from .budget import (
    DEFAULT_BUDGETS, ExitStatsAccumulator, anytime_accuracy, budget_curve, budget_exit_shares,
    evaluate_thresholds, exit_assignment, exit_stats, find_thresholds, thresholds_for_budget,
)
from .original_api import dynamic_evaluate, dynamic_find_threshold

__all__ = [
    "DEFAULT_BUDGETS", "ExitStatsAccumulator", "anytime_accuracy", "budget_curve", "budget_exit_shares",
    "dynamic_evaluate", "dynamic_find_threshold", "evaluate_thresholds", "exit_assignment", "exit_stats",
    "find_thresholds", "thresholds_for_budget",
]

"""Evaluation, budgets, FLOPs, data and checkpoint helpers.

``from utils import dynamic_find_threshold, dynamic_evaluate`` keeps the original
evaluation functions' names and semantics (vectorised here).
"""
from .budget import (
    DEFAULT_BUDGETS, ExitStatsAccumulator, anytime_accuracy, budget_curve, budget_exit_shares,
    dynamic_evaluate, dynamic_find_threshold, evaluate_thresholds, exit_assignment, exit_stats,
    find_thresholds, thresholds_for_budget,
)

__all__ = [
    "DEFAULT_BUDGETS", "ExitStatsAccumulator", "anytime_accuracy", "budget_curve", "budget_exit_shares",
    "dynamic_evaluate", "dynamic_find_threshold", "evaluate_thresholds", "exit_assignment", "exit_stats",
    "find_thresholds", "thresholds_for_budget",
]

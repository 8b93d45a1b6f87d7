"""Budgeted batch classification: per-exit statistics (:mod:`.stats`), the threshold search
(:mod:`.thresholds`), the choice of a stored row (:mod:`.choice`), the original functions by
name (:mod:`.original_api`), FLOPs (:mod:`.flops`) and plots (:mod:`.plots`).

::

    from utils.budget import budget_exit_shares, exit_stats, find_thresholds
"""
from .stats import ExitStatsAccumulator, anytime_accuracy, exit_stats
from .thresholds import (
    DEFAULT_BUDGETS,
    budget_curve,
    budget_exit_shares,
    evaluate_thresholds,
    exit_assignment,
    find_thresholds,
    thresholds_for_budget,
)

__all__ = [
    "DEFAULT_BUDGETS", "ExitStatsAccumulator", "anytime_accuracy", "budget_curve", "budget_exit_shares",
    "evaluate_thresholds", "exit_assignment", "exit_stats", "find_thresholds", "thresholds_for_budget",
]

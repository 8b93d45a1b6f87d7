"""Budgeted batch classification: per-exit statistics and the evaluation loop (:mod:`.stats`),
the threshold search (:mod:`.thresholds`), the stored table and the choice of a row
(:mod:`.choice`), the original functions by name (:mod:`.original_api`), FLOPs (:mod:`.flops`),
plots (:mod:`.plots`) and the reports of ``inference.py`` (:mod:`.report`).

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

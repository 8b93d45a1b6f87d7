"""Engine code by concern: ``data``, ``checkpoint``, ``budget``, ``train``, ``run``, ``predict``,
plus the error types (:mod:`.errors`) and the ``--amp`` rule (:mod:`.precision`).

``from utils import dynamic_find_threshold, dynamic_evaluate`` keeps the original evaluation
functions' names and semantics (vectorised, with the per-tensor statistics kept between calls:
:mod:`utils.budget.original_api`); the budget API is importable from here too.
"""
from .budget import (
    DEFAULT_BUDGETS,
    ExitStatsAccumulator,
    anytime_accuracy,
    budget_curve,
    budget_exit_shares,
    evaluate_thresholds,
    exit_assignment,
    exit_stats,
    find_thresholds,
    thresholds_for_budget,
)
from .budget.original_api import dynamic_evaluate, dynamic_find_threshold

__all__ = [
    "DEFAULT_BUDGETS", "ExitStatsAccumulator", "anytime_accuracy", "budget_curve", "budget_exit_shares",
    "dynamic_evaluate", "dynamic_find_threshold", "evaluate_thresholds", "exit_assignment", "exit_stats",
    "find_thresholds", "thresholds_for_budget",
]

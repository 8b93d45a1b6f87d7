"""The original evaluation functions by their names and signatures, vectorised.

The original ``inference.py`` calls ``dynamic_find_threshold`` and ``dynamic_evaluate`` once per
budget (59 times) on the same full softmax tensors ``(E, N, C)``. Reducing those tensors to the
compact statistics of :mod:`utils.budget` (max probability, correctness, the per-exit sort)
costs far more than the search itself, so the statistics of the last few tensors are kept and
reused while the tensors are unchanged: same object (held by a weak reference, so nothing is
kept alive) and same version counter (bumped by every in-place change). Results are identical
to computing them afresh. Inference-mode tensors have no version counter and are reduced on
every call.
"""
from __future__ import annotations

import weakref
from typing import Callable, TypeVar

import torch
from torch import Tensor

from .stats import exit_stats
from .thresholds import Flops, evaluate_thresholds, find_thresholds

T = TypeVar("T")


class _StatsCache:
    """Values derived from tensors, remembered for the last ``size`` tensor combinations."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._entries: list[tuple[tuple[weakref.ref, ...], tuple[int, ...], object]] = []

    def get(self, tensors: tuple[Tensor, ...], compute: Callable[[], T]) -> T:
        if not all(isinstance(t, Tensor) and not t.is_inference() for t in tensors):
            return compute()
        versions = tuple(t._version for t in tensors)
        for refs, seen, value in self._entries:
            if seen == versions and all(r() is t for r, t in zip(refs, tensors)):
                return value  # type: ignore[return-value]
        value = compute()
        entry = (tuple(weakref.ref(t) for t in tensors), versions, value)
        self._entries = [entry] + [e for e in self._entries if all(r() is not None for r in e[0])][: self.size - 1]
        return value

    def clear(self) -> None:
        self._entries.clear()


_search_stats = _StatsCache()
_eval_stats = _StatsCache()


def _sorted_confidence(probs: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    confidence = probs.amax(dim=-1).to(torch.float32)  # (E, N); values only: twice as fast as max's (values, indices)
    return confidence, confidence.sort(dim=1, descending=True)


@torch.no_grad()
def dynamic_find_threshold(probs: Tensor, targets: Tensor, p: Tensor) -> Tensor:
    """Original-signature threshold search (:func:`utils.budget.find_thresholds`).

    Args:
        probs: ``(E, N, C)`` softmax probabilities of every exit.
        targets: ``(N,)`` labels (unused by the search; kept for the signature).
        p: ``(E,)`` exit shares, e.g. :func:`utils.budget.budget_exit_shares`.

    Returns:
        ``(E,)`` float32 thresholds, the last one ``-1e8``.
    """
    confidence, presorted = _search_stats.get((probs,), lambda: _sorted_confidence(probs))
    return find_thresholds(confidence, p, presorted=presorted)


@torch.no_grad()
def dynamic_evaluate(probs: Tensor, targets: Tensor, flops: Flops, T: Tensor) -> tuple[float, float]:
    """Original-signature evaluation: ``(top-1 %, expected GFLOPs)`` of thresholds ``T``
    (:func:`utils.budget.evaluate_thresholds`).

    Args:
        probs: ``(E, N, C)`` softmax probabilities of every exit.
        targets: ``(N,)`` labels.
        flops: ``E`` cumulative GFLOPs per exit.
        T: ``(E,)`` thresholds.
    """
    confidence, correct = _eval_stats.get((probs, targets), lambda: exit_stats(probs, targets))
    return evaluate_thresholds(confidence, correct, flops, T)

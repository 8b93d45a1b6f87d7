"""Budgeted batch classification: confidence thresholds for early exits.

A DVT cascade has ``E`` exits with increasing cumulative cost ``flops[k]``. A
sample leaves at the first exit ``k`` whose confidence (max softmax probability)
is ``>= T[k]``; the last threshold is ``-1e8`` so every sample leaves somewhere.
For one budget ``p`` the share of samples meant to leave at exit ``k`` is
``q_k ∝ (p / 20) ** k`` (``k = 1..E``), and the thresholds are fitted so that
those shares are met on a calibration set. Sweeping ``p = 1..59`` traces the
accuracy/GFLOPs curve reported in the paper.

Everything here works on a compact per-sample summary, two ``(E, N)`` tensors:
the confidence of every exit and whether its prediction is right. The full
``(E, N, classes)`` softmax (600 MB for ImageNet val) is never needed; use
:class:`ExitStatsAccumulator` (in :mod:`utils.budget.stats`, importable from here too) to build the
summary batch by batch.

The functions reproduce the original implementation bit for bit: the exit
shares and the sample counts ``floor(N * q_k)`` are evaluated in float32 torch
arithmetic as the original does, thresholds are float32 confidence values, and
the expected GFLOPs are accumulated in float32.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence, Union

import torch
from torch import Tensor

DEFAULT_BUDGETS: range = range(1, 60)
"""The 59 budget indices ``p`` of the paper's curve; exit shares ``∝ (p / 20) ** k``."""
NO_EXIT_THRESHOLD: float = 1e8
"""Threshold of an exit that nobody leaves at (its share of samples rounds to zero)."""
FINAL_THRESHOLD: float = -1e8
"""Threshold of the last exit: every sample still running leaves there."""
Flops = Union[Sequence[float], Tensor]
# Cap on budgets x samples handled at once by the batched search, to bound memory
# (the search keeps a few (budgets, N) int32/bool work tensors).
_MAX_WORK_ELEMENTS = 1 << 24


def _geometric_shares(ratio: float, num_exits: int) -> Tensor:
    """Exit shares ``∝ ratio ** k``, ``k = 1..num_exits``, in the original float32 arithmetic."""
    base = torch.full((1,), ratio, dtype=torch.float32)  # ratio rounded to float32, as FloatTensor.fill_
    powers = torch.arange(1, num_exits + 1, dtype=torch.float32)
    shares = torch.exp(torch.log(base) * powers)  # (num_exits,)
    return shares / shares.sum()


def budget_exit_shares(p: int, num_exits: int) -> Tensor:
    """Share of samples meant to leave at each exit for budget index ``p``.

    ``q_k ∝ (p / 20) ** k`` for ``k = 1..num_exits``, computed as
    ``exp(log(p / 20) * k)`` and normalised, all in float32, exactly as the
    original does: the thresholds depend on ``floor(N * q_k)`` and thereby on
    the last bit of ``q_k``.

    Args:
        p: budget index (the paper uses ``1..59``); small ``p`` sends most samples
            to the first exit, large ``p`` to the last.
        num_exits: number of exits ``E`` of the cascade.

    Returns:
        ``(E,)`` float32 tensor on the CPU summing to one.
    """
    if p <= 0:
        raise ValueError(f"budget index p must be positive, got {p}")
    return _geometric_shares(p / 20, num_exits)


def _exit_counts(shares: Tensor, n: int) -> Tensor:
    """``floor(n * shares)`` as the original evaluates it (float32 product), as int64 on the CPU."""
    shares = shares.detach().to(device="cpu", dtype=torch.float32)
    return torch.floor(n * shares).long()


def _search_sorted(confidence: Tensor, order: Tensor, sorted_conf: Tensor, counts: Tensor) -> Tensor:
    """Thresholds for a batch of budgets, given the per-exit descending sort.

    Args:
        confidence: ``(E, N)`` float32.
        order: ``(E, N)`` sample indices sorting each exit's confidence descending.
        sorted_conf: ``(E, N)`` the confidences in that order.
        counts: ``(B, E)`` int64 CPU, number of samples meant to leave at each exit.

    Returns:
        ``(B, E)`` float32 thresholds on the device of ``confidence``.
    """
    num_exits, n = confidence.shape
    num_budgets = counts.shape[0]
    device = confidence.device
    counts = counts.to(device)
    thresholds = torch.full((num_budgets, num_exits), NO_EXIT_THRESHOLD, dtype=torch.float32, device=device)
    exited = torch.zeros(num_budgets, n, dtype=torch.bool, device=device)  # (B, N)
    for k in range(num_exits - 1):
        running = (~exited.index_select(1, order[k])).to(torch.int32)  # (B, N), in exit-k order
        # rank[b, i]: how many of the i+1 most confident samples of exit k are still running
        rank = torch.cumsum(running, dim=1, dtype=torch.int32)  # (B, N)
        target = counts[:, k : k + 1].to(torch.int32)  # (B, 1)
        position = torch.searchsorted(rank, target).clamp_(max=n - 1)  # first i with rank >= target
        found = (target > 0) & (rank[:, -1:] >= target)  # (B, 1)
        value = sorted_conf[k][position]  # (B, 1)
        thresholds[:, k : k + 1] = torch.where(found, value, thresholds[:, k : k + 1])
        # ties included: every sample at least as confident as the threshold leaves here
        exited |= confidence[k].unsqueeze(0) >= thresholds[:, k : k + 1]
    thresholds[:, -1] = FINAL_THRESHOLD
    return thresholds


@torch.no_grad()
def find_thresholds(
    confidence: Tensor, shares: Tensor, presorted: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """Fit the exit thresholds to the wanted exit shares on a calibration set.

    For each exit ``k`` but the last, among the samples that have not left at an
    earlier exit, the threshold is the confidence of the ``floor(N * q_k)``-th
    most confident one (1-based); then every sample whose confidence at ``k`` is
    at least the threshold leaves (ties included, so slightly more than the
    wanted count may leave). If ``floor(N * q_k)`` is zero or fewer samples are
    still running, the threshold stays ``1e8`` and nobody leaves there. The
    last threshold is ``-1e8``. Identical to the original search, bit for bit.

    Args:
        confidence: ``(E, N)`` max softmax probability of every exit (float32;
            other dtypes are converted).
        shares: ``(E,)`` exit shares (e.g. :func:`budget_exit_shares`), or
            ``(B, E)`` for ``B`` budgets at once (one sort serves all of them).
        presorted: ``confidence.sort(dim=1, descending=True)`` of the float32
            confidences, when the caller keeps it for several calls.

    Returns:
        ``(E,)`` (or ``(B, E)``) float32 thresholds on the device of ``confidence``.
    """
    confidence = confidence.to(torch.float32)
    num_exits, n = confidence.shape
    batched = shares.dim() == 2
    shares = shares if batched else shares.unsqueeze(0)  # (B, >=E-1)
    if shares.shape[1] < num_exits - 1:
        raise ValueError(f"need a share for each of the first {num_exits - 1} exits, got {shares.shape[1]}")
    counts = _exit_counts(shares, n)  # (B, E')
    sorted_conf, order = presorted if presorted is not None else confidence.sort(dim=1, descending=True)  # (E, N)
    chunk = max(1, _MAX_WORK_ELEMENTS // max(n, 1))
    thresholds = torch.cat([
        _search_sorted(confidence, order, sorted_conf, counts[i : i + chunk])
        for i in range(0, counts.shape[0], chunk)
    ])  # (B, E)
    return thresholds if batched else thresholds[0]


def find_budget_thresholds(confidence: Tensor, budgets: Sequence[int] = DEFAULT_BUDGETS) -> Tensor:
    """:func:`find_thresholds` for the exit shares of every budget index ``p`` (mode 2 of the
    original): ``(E, N)`` calibration confidences -> ``(P, E)`` thresholds."""
    shares = torch.stack([budget_exit_shares(p, confidence.shape[0]) for p in budgets])  # (P, E)
    return find_thresholds(confidence, shares)


def exit_assignment(confidence: Tensor, thresholds: Tensor) -> Tensor:
    """Index of the exit every sample leaves at: the first ``k`` with ``conf_k >= T_k``.

    Args:
        confidence: ``(E, N)`` max softmax probabilities.
        thresholds: ``(E,)``, or ``(B, E)`` for several threshold sets.

    Returns:
        ``(N,)`` (or ``(B, N)``) int64 exit indices. A sample that passes no
        threshold gets ``E``; with the usual last threshold ``-1e8`` none does.
    """
    num_exits = confidence.shape[0]
    thresholds = thresholds.to(device=confidence.device, dtype=torch.float32)
    confidence = confidence.to(torch.float32)
    shape = thresholds.shape[:-1] + confidence.shape[1:]  # (..., N)
    exit_index = torch.full(shape, num_exits, dtype=torch.long, device=confidence.device)
    for k in reversed(range(num_exits)):  # the earliest passing exit is written last
        passes = confidence[k] >= thresholds[..., k : k + 1]  # (..., N)
        exit_index.masked_fill_(passes, k)
    return exit_index


def _evaluate_batch(
    confidence: Tensor, correct: Tensor, flops: Flops, thresholds: Tensor
) -> tuple[list[float], list[float]]:
    """Top-1 % and expected GFLOPs for ``(B, E)`` threshold sets; returns two lists of B floats."""
    num_exits, n = confidence.shape
    exit_index = exit_assignment(confidence, thresholds)  # (B, N)
    left = exit_index < num_exits
    hit = correct.to(exit_index.device).unsqueeze(0).expand(exit_index.shape[0], -1, -1)
    hit = hit.gather(1, exit_index.clamp(max=num_exits - 1).unsqueeze(1)).squeeze(1) & left  # (B, N)
    hits = hit.sum(dim=1).tolist()
    # leavers per exit, (B, E); the extra bin counts samples that never leave
    offsets = torch.arange(exit_index.shape[0], device=exit_index.device).unsqueeze(1) * (num_exits + 1)
    leavers = torch.bincount((exit_index + offsets).flatten(), minlength=exit_index.shape[0] * (num_exits + 1))
    leavers = leavers.view(-1, num_exits + 1)[:, :num_exits].cpu()
    # float32 like the original: share_k = count_k / N, summed exit by exit
    flops32 = torch.as_tensor(flops, dtype=torch.float32).flatten()[:num_exits].cpu()
    terms = leavers.to(torch.float32) / n * flops32  # (B, E)
    total = torch.zeros(terms.shape[0], dtype=torch.float32)
    for k in range(num_exits):
        total = total + terms[:, k]
    return [h * 100.0 / n for h in hits], total.tolist()


@torch.no_grad()
def evaluate_thresholds(
    confidence: Tensor, correct: Tensor, flops: Flops, thresholds: Tensor
) -> tuple[float, float]:
    """Accuracy and cost of early exiting with the given thresholds.

    Args:
        confidence: ``(E, N)`` max softmax probabilities.
        correct: ``(E, N)`` bool, whether each exit is right.
        flops: ``E`` cumulative GFLOPs of running the cascade up to each exit.
        thresholds: ``(E,)`` exit thresholds.

    Returns:
        ``(top-1 %, expected GFLOPs)``; expected GFLOPs is ``sum_k share_k * flops[k]``
        with ``share_k`` the fraction of samples leaving at exit ``k``. Samples that
        pass no threshold count as wrong and cost nothing, as in the original.
    """
    if thresholds.dim() != 1:
        raise ValueError(f"thresholds must be (exits,), got shape {tuple(thresholds.shape)}")
    top1, gflops = _evaluate_batch(confidence, correct, flops, thresholds.unsqueeze(0))
    return top1[0], gflops[0]


@torch.no_grad()
def budget_curve(
    val_conf: Tensor,
    val_correct: Tensor,
    flops: Flops,
    calib_conf: Tensor | None = None,
    thresholds: Tensor | None = None,
    budgets: Sequence[int] = DEFAULT_BUDGETS,
) -> tuple[Tensor, list[list[float]]]:
    """The budgeted-batch-classification curve (evaluation modes 1 and 2).

    Give exactly one of ``calib_conf`` (mode 2: fit thresholds for every budget
    on the calibration set, then evaluate them on the validation set) or
    ``thresholds`` (mode 1: evaluate stored thresholds).

    Args:
        val_conf: ``(E, N)`` validation confidences.
        val_correct: ``(E, N)`` bool validation correctness.
        flops: ``E`` cumulative GFLOPs per exit.
        calib_conf: ``(E, M)`` calibration confidences.
        thresholds: ``(P, E)`` stored thresholds, one row per budget.
        budgets: budget indices ``p`` used with ``calib_conf`` (default ``1..59``).

    Returns:
        ``thresholds``: ``(P, E)`` float32 on the CPU;
        ``[gflops, top1]``: two lists of ``P`` floats, the expected GFLOPs and the
        top-1 % of every budget (the original ``budgeted_batch_classification``).
    """
    if (calib_conf is None) == (thresholds is None):
        raise ValueError("give exactly one of calib_conf (search) or thresholds (stored)")
    num_exits = val_conf.shape[0]
    if calib_conf is not None:
        if calib_conf.shape[0] != num_exits:
            raise ValueError(f"calibration has {calib_conf.shape[0]} exits, validation {num_exits}")
        thresholds = find_budget_thresholds(calib_conf, budgets)
    if thresholds.dim() != 2 or thresholds.shape[1] != num_exits:
        raise ValueError(f"thresholds must be (budgets, {num_exits}), got shape {tuple(thresholds.shape)}")
    top1, gflops = _evaluate_batch(val_conf, val_correct, flops, thresholds)
    return thresholds.to(device="cpu", dtype=torch.float32), [gflops, top1]


class BudgetThresholds(NamedTuple):
    """Result of :func:`thresholds_for_budget`; the numbers are on the calibration set."""

    thresholds: Tensor  # (E,) float32
    ratio: float  # r of the chosen shares q_k ∝ r ** k (p / 20 in the paper); 0 / inf: all leave first / last
    expected_gflops: float
    top1: float


@torch.no_grad()
def thresholds_for_budget(
    calib_conf: Tensor,
    calib_correct: Tensor,
    flops: Flops,
    target_gflops: float,
    grid_size: int = 128,
    bisection_steps: int = 30,
    ratio_range: tuple[float, float] = (1e-3, 1e3),
) -> BudgetThresholds:
    """Thresholds whose expected cost on the calibration set stays within a GFLOPs budget.

    Method: the candidates are the paper's family of exit shares ``q_k ∝ r ** k``
    with a continuous ratio ``r`` (``r = p / 20`` gives the 59 standard budgets),
    plus the two extremes "everyone leaves at the first exit" and "everyone runs
    to the last". The calibration cost grows with ``r`` but not strictly
    (thresholds take ties along), so we

    1. evaluate ``grid_size`` log-spaced ratios in ``ratio_range`` and the
       standard ``p / 20``, ``p = 1..59``;
    2. bisect (in ``log r``, ``bisection_steps`` times) between the largest
       affordable grid ratio and the next grid ratio, to get close to the budget;
    3. among all evaluated candidates whose expected GFLOPs ``<= target_gflops``,
       return the most accurate on the calibration set (ties: the cheaper one).

    Costs are compared in float32 (the target is rounded to float32, like the
    per-exit costs), so a budget equal to an exit's cost is met exactly.

    Args:
        calib_conf: ``(E, N)`` calibration confidences.
        calib_correct: ``(E, N)`` bool calibration correctness.
        flops: ``E`` cumulative GFLOPs per exit, increasing.
        target_gflops: the wanted average GFLOPs per sample.
        grid_size: number of log-spaced ratios of the coarse search.
        bisection_steps: number of bisection steps after the coarse search.
        ratio_range: ``(smallest, largest)`` ratio of the coarse search.

    Returns:
        :class:`BudgetThresholds` with ``(E,)`` thresholds on the CPU.

    Raises:
        ValueError: if the budget is below the cost of the first exit, which
            every sample has to run.
    """
    num_exits = calib_conf.shape[0]
    flops32 = torch.as_tensor(flops, dtype=torch.float32).flatten()[:num_exits]
    target32 = float(torch.tensor(target_gflops, dtype=torch.float32))
    if target32 < float(flops32[0]):
        raise ValueError(
            f"budget of {target_gflops} GFLOPs is below the cost of the first exit "
            f"({float(flops32[0]):.6g} GFLOPs), which every sample has to run")

    ratios, thresholds, gflops, top1 = _budget_candidates(
        calib_conf, calib_correct, flops32, target32, grid_size, bisection_steps, ratio_range)
    best = min(
        (i for i, cost in enumerate(gflops) if cost <= target32),
        key=lambda i: (-top1[i], gflops[i]),
    )
    return BudgetThresholds(thresholds[best].clone(), ratios[best], gflops[best], top1[best])


def _budget_candidates(
    calib_conf: Tensor,
    calib_correct: Tensor,
    flops32: Tensor,
    target32: float,
    grid_size: int,
    bisection_steps: int,
    ratio_range: tuple[float, float],
) -> tuple[list[float], list[Tensor], list[float], list[float]]:
    """The candidates of :func:`thresholds_for_budget` (steps 1 and 2 and the two extremes):
    their ratios, thresholds, expected GFLOPs and top-1 on the calibration set."""
    num_exits = calib_conf.shape[0]
    ratios: list[float] = []
    thresholds: list[Tensor] = []
    gflops: list[float] = []
    top1: list[float] = []

    def add(new_ratios: list[float], new_thresholds: Tensor) -> None:
        acc, cost = _evaluate_batch(calib_conf, calib_correct, flops32, new_thresholds)
        ratios.extend(new_ratios)
        thresholds.extend(new_thresholds.cpu())
        gflops.extend(cost)
        top1.extend(acc)

    def search(new_ratios: list[float]) -> None:
        shares = torch.stack([_geometric_shares(r, num_exits) for r in new_ratios])  # (R, E)
        add(new_ratios, find_thresholds(calib_conf, shares))

    # the extremes: everyone leaves at the first exit (r -> 0) / runs to the last (r -> inf)
    first_only = torch.full((1, num_exits), FINAL_THRESHOLD, dtype=torch.float32)
    last_only = torch.full((1, num_exits), NO_EXIT_THRESHOLD, dtype=torch.float32)
    last_only[0, -1] = FINAL_THRESHOLD
    add([0.0], first_only)
    add([float("inf")], last_only)

    low, high = ratio_range
    grid = torch.logspace(torch.log10(torch.tensor(low)), torch.log10(torch.tensor(high)), grid_size,
                          dtype=torch.float64).tolist()
    grid = sorted(set(grid) | {p / 20 for p in DEFAULT_BUDGETS})
    start = len(ratios)
    search(grid)

    grid_cost = gflops[start:]
    affordable = [i for i, cost in enumerate(grid_cost) if cost <= target32]
    if affordable and affordable[-1] + 1 < len(grid):
        lo, hi = grid[affordable[-1]], grid[affordable[-1] + 1]
        for _ in range(bisection_steps):
            mid = (lo * hi) ** 0.5
            search([mid])
            if gflops[-1] <= target32:
                lo = mid
            else:
                hi = mid
    return ratios, thresholds, gflops, top1

"""Accuracy against average cost: the budgeted-batch-classification curve of early-exit
cascades, with the per-exit (anytime) points.

Figures are drawn on matplotlib's Agg canvas directly, without pyplot, so importing this
module never changes the global backend of a notebook or GUI session and works headless.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..checkpoint.files import atomic_write


class BudgetCurve(NamedTuple):
    """One cascade's numbers.

    label: legend name.
    gflops, top1: the budgeted curve, one point per budget (average GFLOPs per image, top-1 %).
    exit_gflops, exit_top1: cumulative GFLOPs and top-1 % of every exit, or empty.
    """
    label: str
    gflops: Sequence[float]
    top1: Sequence[float]
    exit_gflops: Sequence[float] = ()
    exit_top1: Sequence[float] = ()


class OperatingPoint(NamedTuple):
    """A single marked result, e.g. the thresholds chosen for a requested budget."""
    label: str
    gflops: float
    top1: float


def plot_budget_curves(
        curves: Sequence[BudgetCurve],
        path: str | os.PathLike,
        title: Optional[str] = None,
        points: Sequence[OperatingPoint] = (),
        dpi: int = 150,
) -> Path:
    """Draw accuracy against GFLOPs for one or more cascades and save it as an image.

    Args:
        curves: the cascades to draw; each gets its own colour for curve and exit points.
        path: output file; the format follows the suffix (``.png``, ``.pdf``, ``.svg``).
        title: figure title.
        points: extra marked results (stars), e.g. operating points for a budget.
        dpi: resolution of raster formats.

    Returns:
        The path written.
    """
    fig = Figure(figsize=(6.4, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, curve in enumerate(curves):
        color = f"C{i}"
        if len(curve.gflops) != len(curve.top1):
            raise ValueError(f"{curve.label}: {len(curve.gflops)} GFLOPs values but {len(curve.top1)} accuracies")
        if len(curve.gflops):
            # budgets are not strictly ordered by cost (threshold ties), so draw the line by cost
            order = sorted(range(len(curve.gflops)), key=lambda j: curve.gflops[j])
            ax.plot([curve.gflops[j] for j in order], [curve.top1[j] for j in order], "-", color=color,
                    marker=".", markersize=4, label=f"{curve.label}: budgeted batch")
        if len(curve.exit_gflops):
            ax.plot(curve.exit_gflops, curve.exit_top1, "o", color=color, markersize=7,
                    markerfacecolor="white", markeredgewidth=1.5, label=f"{curve.label}: exits")
            for k, (x, y) in enumerate(zip(curve.exit_gflops, curve.exit_top1)):
                ax.annotate(f"exit {k + 1}", (x, y), textcoords="offset points", xytext=(6, -12), fontsize=8,
                            color=color)
    for j, point in enumerate(points):
        ax.plot([point.gflops], [point.top1], "*", markersize=13, color=f"C{len(curves) + j}", label=point.label)
    ax.set_xlabel("average GFLOPs per image")
    ax.set_ylabel("top-1 accuracy (%)")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi)


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 150) -> Path:
    """``fig.savefig(path)`` written atomically (:func:`~utils.checkpoint.files.atomic_write`): a
    crash or a full disk never leaves half an image in place of the last whole one. The format
    follows ``path``'s suffix, as ``savefig``'s does."""
    path = Path(path)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=path.suffix[1:].lower() or None))


def plot_accuracy_vs_gflops(
        path: str | os.PathLike,
        gflops: Sequence[float],
        top1: Sequence[float],
        exit_gflops: Sequence[float] = (),
        exit_top1: Sequence[float] = (),
        label: str = "DVT",
        title: Optional[str] = None,
        points: Sequence[OperatingPoint] = (),
) -> Path:
    """One cascade's budgeted curve with its per-exit points; see :func:`plot_budget_curves`.

    Args:
        path: output image file.
        gflops, top1: the budgeted curve (``budgeted_batch_classification`` of a checkpoint).
        exit_gflops, exit_top1: per-exit cumulative GFLOPs (``flops``) and top-1 %
            (``anytime_classification``).
        label: legend name.
        title: figure title.
        points: extra marked results.
    """
    curve = BudgetCurve(label, list(gflops), list(top1), list(exit_gflops), list(exit_top1))
    return plot_budget_curves([curve], path, title=title, points=points)

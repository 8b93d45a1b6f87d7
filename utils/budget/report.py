"""The results of an evaluation as ``inference.py`` reports them: the original's three result
lines, a line and a record per budget and per early-exit run (stdout), and ``results.json``
with the accuracy/GFLOPs plot."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch

from ..checkpoint.files import atomic_write
from .plots import OperatingPoint, plot_accuracy_vs_gflops
from .stats import EarlyExitRun, ValRun, exit_shares, expected_gflops
from .thresholds import BudgetThresholds, evaluate_thresholds, exit_assignment

RESULTS_JSON = "results.json"
PLOT_FILE = "accuracy_vs_gflops.png"


def fmt_list(values: Sequence[float], digits: int = 4) -> str:
    """``[0.4701, 1.46]``: every value with ``digits`` significant digits."""
    return "[" + ", ".join(f"{v:.{digits}g}" for v in values) + "]"


def print_results(flops: Sequence, anytime: Sequence, curve: Sequence) -> None:
    """The original's three result lines."""
    print("flops :", flops)
    print("anytime_classification :", anytime)
    print("budgeted_batch_classification :", curve)


def budget_report(target: float, found: BudgetThresholds, val: ValRun, flops: Sequence[float]) -> dict:
    """Thresholds chosen on the calibration set for an average cost, evaluated on val: printed
    as one line, returned as a record."""
    top1, gflops = evaluate_thresholds(val.confidence, val.correct, flops, found.thresholds)
    shares = exit_shares(exit_assignment(val.confidence, found.thresholds), len(flops))
    print(f"budget {target:g} GFLOPs : top-1 {top1:.2f}% at {gflops:.4g} GFLOPs on val "
          f"(calibration: {found.top1:.2f}% at {found.expected_gflops:.4g} GFLOPs), "
          f"thresholds {fmt_list(found.thresholds.tolist())}, exit shares {fmt_list(shares, 3)}")
    return dict(target_gflops=target, thresholds=found.thresholds.tolist(), ratio=found.ratio,
                calib_gflops=found.expected_gflops, calib_top1=found.top1, val_top1=top1, val_gflops=gflops,
                val_exit_shares=shares)


def early_exit_report(label: str, thresholds: torch.Tensor, run: EarlyExitRun, val: ValRun,
                      flops: Sequence[float]) -> dict:
    """Accuracy, exit shares and speed of one adaptive run, checked against the simulation:
    printed as one line, returned as a record."""
    num_exits, n = val.confidence.shape
    simulated = exit_assignment(val.confidence, thresholds)
    simulated_prediction = val.prediction.gather(0, simulated.clamp(max=num_exits - 1).unsqueeze(0)).squeeze(0)
    shares = exit_shares(run.exit_index, num_exits)
    gflops = expected_gflops(shares, flops)
    rate, full_rate = n / max(run.seconds, 1e-12), n / max(val.seconds, 1e-12)
    r = dict(
        label=label, thresholds=thresholds.tolist(), top1=(run.prediction == val.targets).sum().item() * 100.0 / n,
        simulated_top1=evaluate_thresholds(val.confidence, val.correct, flops, thresholds)[0], exit_shares=shares,
        expected_gflops=gflops, images_per_second=rate, all_exits_images_per_second=full_rate,
        measured_speedup=rate / full_rate, flops_speedup=float(flops[-1]) / gflops,
        exits_differing_from_simulation=int((run.exit_index != simulated).sum()),
        predictions_differing_from_simulation=int((run.prediction != simulated_prediction).sum()))
    print(f"early_exit {label} : top-1 {r['top1']:.2f}% (simulated {r['simulated_top1']:.2f}%), "
          f"exit shares {fmt_list(shares, 3)}, {gflops:.4g} GFLOPs/image, {rate:.1f} images/s vs "
          f"{full_rate:.1f} images/s running all exits ({r['measured_speedup']:.2f}x measured, "
          f"{r['flops_speedup']:.2f}x by FLOPs; model time only), "
          f"{n - r['exits_differing_from_simulation']}/{n} exits and "
          f"{n - r['predictions_differing_from_simulation']}/{n} predictions as simulated")
    return r


def write_json(obj: dict, path: Path) -> None:
    """Write atomically (:func:`~utils.checkpoint.files.atomic_write`), so a reader never sees half a file."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, allow_nan=True) + "\n"))


def save_outputs(folder: str | os.PathLike, report: dict) -> tuple[Path, Path]:
    """Write ``report`` (its ``flops``, ``anytime_classification``,
    ``budgeted_batch_classification``, ``model_name`` and any ``budget_results``) as
    :data:`RESULTS_JSON` and draw its curve, exits and budgets in :data:`PLOT_FILE`, in
    ``folder``; returns the two paths."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    write_json(report, out / RESULTS_JSON)
    name = report.get("model_name") or "DVT"
    curve = report["budgeted_batch_classification"]
    points = [OperatingPoint(f"budget {r['target_gflops']:g} GFLOPs", r["val_gflops"], r["val_top1"])
              for r in report.get("budget_results", ())]
    plot_accuracy_vs_gflops(out / PLOT_FILE, curve[0], curve[1], report["flops"], report["anytime_classification"],
                            label=name, title=f"{name}: accuracy against average cost", points=points)
    return out / RESULTS_JSON, out / PLOT_FILE

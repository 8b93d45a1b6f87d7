"""Compare cascades on one accuracy-against-GFLOPs plot and one table.

Each run is the ``results.json`` of ``inference.py --output DIR`` (or DIR itself), or a
checkpoint that stores its results (a released ``.pth.tar``, ``main.py``'s ``released.pth.tar``,
a file written by ``inference.py --save_checkpoint``), optionally named ``LABEL=PATH``. The table
gives, per run, each exit's top-1 and GFLOPs, the best budgeted top-1, the most accurate budget
within each ``--at`` GFLOPs, and the cheapest budget that reaches each ``--reach`` top-1: the
numbers an ablation (feature or relation reuse off) or a comparison of cascades is read from.

Usage (from the repository root)::

    python scripts/compare_runs.py full=output/full no_reuse=output/no_reuse/results.json \\
        --at 1.0 2.0 --reach 75 --out compare.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.budget.choice import as_plain, best_row_within, cheapest_row_reaching  # noqa: E402
from utils.budget.plots import BudgetCurve, plot_budget_curves  # noqa: E402
from utils.checkpoint.files import load_checkpoint_file  # noqa: E402
from utils.errors import CheckpointError, ConfigError, DataError, run_command  # noqa: E402

RESULTS_JSON = "results.json"


class Run(NamedTuple):
    label: str
    model: str
    exit_gflops: list[float]
    exit_top1: list[float]
    gflops: list[float]  # the budgeted curve: one value per budget row
    top1: list[float]
    images: Optional[int]  # validation images, where the file says


def read_run(spec: str) -> Run:
    """``[LABEL=]PATH`` -> its numbers; a clear error for a path that is missing or holds no results."""
    label, sep, path = spec.partition("=")
    if not sep:
        label, path = "", spec
    source = Path(path)
    if source.is_dir():
        source = source / RESULTS_JSON
    if not source.is_file():
        raise DataError(f"{path}: no such file (a results.json of inference.py --output, its folder, or a checkpoint)")
    if source.suffix == ".json":
        try:
            found = json.loads(source.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{source} is not readable JSON: {e}") from None
    else:
        found = load_checkpoint_file(source)
    default = source.parent.name if source.name == RESULTS_JSON else source.name.split(".")[0]
    return _run(found if isinstance(found, dict) else {}, label or default, source)


def _run(found: dict, label: str, source: Path) -> Run:
    missing = [k for k in ("flops", "anytime_classification", "budgeted_batch_classification") if k not in found]
    if missing:
        raise CheckpointError(f"{source} has no {', '.join(repr(k) for k in missing)}: compare the results.json "
                              "of inference.py --output, a released checkpoint, or one written by inference.py "
                              "--save_checkpoint")
    curve = as_plain(found["budgeted_batch_classification"])
    exits, anytime = as_plain(found["flops"]), as_plain(found["anytime_classification"])
    if not (len(curve) == 2 and len(curve[0]) == len(curve[1]) > 0 and len(exits) == len(anytime) > 0):
        raise CheckpointError(f"{source}: 'budgeted_batch_classification' must be [GFLOPs, top-1] lists of one "
                              "length, and 'flops' and 'anytime_classification' one value per exit")
    return Run(label, str(found.get("model_name") or found.get("arch") or "-"), [float(v) for v in exits],
               [float(v) for v in anytime], [float(v) for v in curve[0]], [float(v) for v in curve[1]],
               found.get("num_validation"))


def table(runs: Sequence[Run], at: Sequence[float], reach: Sequence[float]) -> list[str]:
    """The markdown table of the runs."""
    head = ["run", "model", "exits top-1 (%)", "exits GFLOPs", "best budgeted top-1 (GFLOPs)"]
    head += [f"top-1 within {g:g} GFLOPs" for g in at] + [f"GFLOPs for {t:g}% top-1" for t in reach]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for run in runs:
        best = best_row_within(run.gflops, run.top1, float("inf"))
        cells = [run.label, run.model, " / ".join(f"{v:.2f}" for v in run.exit_top1),
                 " / ".join(f"{v:.4g}" for v in run.exit_gflops), f"{run.top1[best]:.2f} ({run.gflops[best]:.4g})"]
        for g in at:
            row = best_row_within(run.gflops, run.top1, g)
            cells.append("-" if row is None else f"{run.top1[row]:.2f} ({run.gflops[row]:.4g})")
        for t in reach:
            row = cheapest_row_reaching(run.gflops, run.top1, t)
            cells.append("-" if row is None else f"{run.gflops[row]:.4g} ({run.top1[row]:.2f}%)")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="[LABEL=]PATH",
                   help="results.json of inference.py --output (or its folder), or a checkpoint with results")
    p.add_argument("--at", type=float, nargs="+", default=[], metavar="GFLOPS",
                   help="also give each run's most accurate budget within these average GFLOPs per image")
    p.add_argument("--reach", type=float, nargs="+", default=[], metavar="TOP1",
                   help="also give each run's cheapest budget that reaches these top-1 accuracies (%%)")
    p.add_argument("--out", default="compare.png", help="the plot (.png, .pdf or .svg; default: compare.png)")
    p.add_argument("--title", default="accuracy against average cost")
    return p


def compare(args: argparse.Namespace) -> list[str]:
    """The body of the command: the table's lines, after the plot is written."""
    if Path(args.out).suffix.lower() not in (".png", ".pdf", ".svg"):
        raise ConfigError(f"--out must name a .png, .pdf or .svg file, got {args.out}")
    if any(g <= 0 for g in args.at):
        raise ConfigError("--at takes positive GFLOPs")
    runs = [read_run(spec) for spec in args.runs]
    labels = [run.label for run in runs]
    if len(set(labels)) < len(labels):
        raise ConfigError(f"two runs are labelled alike ({', '.join(labels)}): name them LABEL=PATH")
    lines = table(runs, args.at, args.reach)
    images = {run.images for run in runs if run.images is not None}
    if len(images) > 1:
        lines.append(f"note: the runs were evaluated on different numbers of images ({sorted(images)})")
    curves = [BudgetCurve(r.label, r.gflops, r.top1, r.exit_gflops, r.exit_top1) for r in runs]
    lines.append(f"wrote {plot_budget_curves(curves, args.out, title=args.title)}")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; returns 0 when done, 1 for a missing or unreadable run, 2 for bad options
    (one line on stderr)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    return run_command(lambda: print("\n".join(compare(args))))


if __name__ == "__main__":
    sys.exit(main())

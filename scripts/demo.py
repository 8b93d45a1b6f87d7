"""The whole DVT story on a CPU in a few minutes.

    bash scripts/demo.sh            # installs the requirements, then runs this
    python scripts/demo.py          # the same, without the install step

1. Draws (once, cached under ``data/``) a small dataset of shapes whose images range from
   easy (a large, high-contrast shape) to hard (a small, faint shape among clutter).
2. Trains the tiny DVT on it with ``main.py`` (CPU; its config is ``configs/demo.yaml``).
3. Evaluates the released-format checkpoint with ``inference.py --eval_mode 2``: per-exit
   accuracy, the budgeted batch classification table and the accuracy-vs-GFLOPs plot.
4. Finds the smallest budget at which the dynamic cascade reaches the last exit's accuracy
   (within ``--tolerance`` points) and runs real early exit at that budget to measure the
   throughput against running every exit.
5. Draws which images leave at which exit (``scripts/visualize_exits.py``).

Every step runs the project's own command-line programs (in this process, to save start-up
time); the equivalent commands are printed so that each step can be re-run alone. Outputs go
to ``--output`` (default ``output/demo``): ``accuracy_vs_gflops.png``, ``results.json``,
``exits.png`` and ``demo.json`` (the numbers below).
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

__all__ = ["DEMO_DATA", "QUICK", "matching_budget", "run_demo", "main"]

DEMO_CONFIG = ROOT / "configs" / "demo.yaml"

DEMO_DATA: dict[str, Any] = dict(num_classes=4, train_per_class=500, val_per_class=200, img_size=64,
                                 difficulty_power=2.0, seed=0)
"""The shapes dataset of the demo (arguments of :func:`utils.data.synthetic.make_shapes_dataset`): four
shapes (circle, ring, plus, triangle), 2,000 training and 800 validation images at 64 pixels, more
than half of them easy (``difficulty_power`` 2)."""

QUICK: dict[str, Any] = dict(data=dict(num_classes=3, train_per_class=8, val_per_class=6, img_size=32),
                             train=["--epochs", "1", "--batch-size", "8", "--calib-size", "16"])
"""Settings of ``--quick``: a run of seconds that goes through every step (for tests)."""


def matching_budget(gflops: Sequence[float], top1: Sequence[float], last_top1: float, tolerance: float
                    ) -> Optional[int]:
    """Index of the cheapest point of the budget curve whose accuracy is within ``tolerance``
    points of ``last_top1`` (the last exit's), or None when no point gets there."""
    ok = [i for i, t in enumerate(top1) if t >= last_top1 - tolerance]
    return min(ok, key=lambda i: (gflops[i], -top1[i])) if ok else None


def _command(program: str, argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in ["python", program, *argv])


def _step(title: str, program: str, entry: Callable[[Sequence[str]], int], argv: list[str]) -> float:
    """Run one of the project's programs in this process; returns the seconds it took."""
    print(f"\n=== {title}\n$ {_command(program, argv)}", flush=True)
    start = time.perf_counter()
    status = entry(argv)
    if status != 0:
        raise SystemExit(f"demo: {program} stopped with status {status}")
    return time.perf_counter() - start


def run_demo(output: Path, data: Path, quick: bool = False, tolerance: float = 0.5, batch_size: int = 64,
             workers: int = 0, threads: Optional[int] = None, seed: int = 0) -> dict[str, Any]:
    """Run the five steps; returns the numbers written to ``output/demo.json``."""
    import torch

    import inference
    import main as train_main
    sys.path.insert(0, str(ROOT / "scripts"))
    import visualize_exits

    from utils.budget.report import RESULTS_JSON
    from utils.data.synthetic import make_shapes_dataset

    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    output.mkdir(parents=True, exist_ok=True)
    data_args = dict(DEMO_DATA, **(QUICK["data"] if quick else {}))

    print(f"=== 1/5 dataset: {data} (drawn once, then cached)", flush=True)
    t = time.perf_counter()
    made = make_shapes_dataset(data, **data_args)
    seconds["dataset"] = time.perf_counter() - t
    print(f"{'drew' if made.created else 'found'} {made.num_train} training and {made.num_val} validation "
          f"images of {len(made.classes)} shapes ({', '.join(made.classes)}) in {seconds['dataset']:.1f} s")

    run_dir = output / "train" / "demo"
    if run_dir.exists():  # a new run each time: the demo shows training, not resuming
        shutil.rmtree(run_dir)
    train_argv = [str(data), "--config", str(DEMO_CONFIG), "--img-size", str(data_args["img_size"]),
                  "--device", "cpu", "--output", str(output), "--experiment", "demo", "--seed", str(seed),
                  "--workers", str(workers), *(QUICK["train"] if quick else [])]
    seconds["train"] = _step("2/5 training the tiny DVT (main.py)", "main.py", train_main.main, train_argv)
    released = run_dir / "released.pth.tar"

    evaluated = output / "dvt_tiny_demo.pth.tar"
    eval_argv = ["--data_url", str(data), "--checkpoint_path", str(released), "--eval_mode", "2",
                 "--batch_size", str(batch_size), "--workers", str(workers), "--device", "cpu",
                 "--calib_transform", "eval", "--seed", str(seed), "--output", str(output),
                 "--save_checkpoint", str(evaluated)]
    seconds["evaluate"] = _step("3/5 per-exit accuracy and budgeted batch classification (inference.py)",
                                "inference.py", inference.main, eval_argv)
    results = json.loads((output / RESULTS_JSON).read_text())
    flops, anytime = results["flops"], results["anytime_classification"]
    curve_gflops, curve_top1 = results["budgeted_batch_classification"]
    index = matching_budget(curve_gflops, curve_top1, anytime[-1], tolerance)
    if index is None:  # cannot happen with thresholds that send everyone to the last exit; kept honest
        index = max(range(len(curve_top1)), key=lambda i: curve_top1[i])
    budget_index = index + 1  # inference.py's --budget_index is 1-based

    early_dir = output / "early_exit"
    early_argv = ["--data_url", str(data), "--checkpoint_path", str(evaluated), "--eval_mode", "1",
                  "--batch_size", str(batch_size), "--workers", str(workers), "--device", "cpu",
                  "--budget_index", str(budget_index), "--early_exit", "--no_progress", "--output", str(early_dir)]
    seconds["early_exit"] = _step(
        f"4/5 real early exit at the cheapest budget within {tolerance} points of the last exit (inference.py)",
        "inference.py", inference.main, early_argv)
    early = json.loads((early_dir / RESULTS_JSON).read_text())["early_exit"][0]

    picture = output / "exits.png"
    vis_argv = ["--data_url", str(data), "--checkpoint_path", str(evaluated), "--budget_index", str(budget_index),
                "--out", str(picture), "--batch_size", str(batch_size), "--seed", str(seed)]
    seconds["visualize"] = _step("5/5 which images leave at which exit (scripts/visualize_exits.py)",
                                 "scripts/visualize_exits.py", visualize_exits.main, vis_argv)

    seconds["total"] = time.perf_counter() - started
    summary = dict(
        dataset=dict(root=str(data), **data_args), flops=flops, anytime_classification=anytime,
        tolerance_points=tolerance, budget_index=budget_index, thresholds=early["thresholds"],
        matched_top1=curve_top1[index], matched_gflops=curve_gflops[index],
        gflops_fraction_of_last_exit=curve_gflops[index] / flops[-1], exit_shares=early["exit_shares"],
        early_exit_top1=early["top1"], early_exit_images_per_second=early["images_per_second"],
        all_exits_images_per_second=early["all_exits_images_per_second"],
        measured_speedup=early["measured_speedup"], flops_speedup=early["flops_speedup"],
        outputs=dict(plot=str(output / "accuracy_vs_gflops.png"), results=str(output / RESULTS_JSON),
                     exits=str(picture), checkpoint=str(evaluated)),
        seconds=seconds)
    (output / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary)
    return summary


def print_summary(s: dict[str, Any]) -> None:
    flops, anytime = s["flops"], s["anytime_classification"]
    print("\n=== what DVT did")
    for k, (f, a) in enumerate(zip(flops, anytime)):
        print(f"exit {k + 1}: top-1 {a:6.2f}% at {f:.4g} GFLOPs per image (every image through exit {k + 1})")
    print(f"dynamic cascade: top-1 {s['matched_top1']:.2f}% (last exit {anytime[-1]:.2f}%, tolerance "
          f"{s['tolerance_points']} points) at {s['matched_gflops']:.4g} GFLOPs per image = "
          f"{100 * s['gflops_fraction_of_last_exit']:.0f}% of the last exit's cost; exit shares "
          + ", ".join(f"{100 * x:.0f}%" for x in s["exit_shares"]))
    print(f"real early exit at that budget: {s['early_exit_images_per_second']:.0f} images/s against "
          f"{s['all_exits_images_per_second']:.0f} images/s running every exit ({s['measured_speedup']:.2f}x "
          f"measured, {s['flops_speedup']:.2f}x promised by the FLOPs), top-1 {s['early_exit_top1']:.2f}%")
    out = s["outputs"]
    print(f"wrote {out['plot']}, {out['results']}, {out['exits']} and the checkpoint {out['checkpoint']}")
    print(f"demo took {s['seconds']['total']:.0f} s (" + ", ".join(
        f"{k} {v:.0f} s" for k, v in s["seconds"].items() if k != "total") + ")")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=str(ROOT / "output" / "demo"), help="folder for every output")
    p.add_argument("--data", default=str(ROOT / "data" / "demo_shapes"), help="dataset folder (made once)")
    p.add_argument("--tolerance", type=float, default=0.5,
                   help="points of top-1 below the last exit that still count as matching it")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="data loading processes")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a tiny run of seconds through every step (for tests)")
    args = p.parse_args(argv)
    try:
        run_demo(Path(args.output), Path(args.data), args.quick, args.tolerance, args.batch_size, args.workers,
                 args.threads, args.seed)
    except (ValueError, OSError) as e:  # e.g. --data names a folder that is not a generated dataset
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

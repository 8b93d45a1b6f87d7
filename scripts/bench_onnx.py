"""Benchmark: the stages in ONNX Runtime against eager PyTorch, float32, all exits and real early exit.

The cascade (random seeded weights, or ``--checkpoint_path``) is exported stage by stage
(:mod:`models.deploy_onnx`) and the same random images are classified four ways, alternately,
iteration by iteration: every exit in PyTorch (``model(x)``) and in ONNX Runtime (the sessions
in turn), and real early exit in both (:func:`models.dvt.run_early_exit` between the stages,
eager in PyTorch, over the sessions in ONNX Runtime). The thresholds are fitted on other random
images to the paper's exit shares of budget row ``--budget-index``. The best (shortest) time
of each way is kept: on a shared machine other processes only ever add time. Both sides get
the same number of threads (``--threads``, default torch's).

Usage (from the repository root)::

    python scripts/bench_onnx.py [--model DVT_Deit_small] [--img-size 224] [--batch-sizes 1 32]
        [--threads N] [--iters 5] [--images 64] [--budget-index 20] [--onnx DIR] [--providers cpu]

Needs onnx, onnxscript and onnxruntime: ``pip install -r requirements-deploy.txt``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark import machine_description  # noqa: E402

from models import build_dvt  # noqa: E402
from models.deploy_onnx import DEFAULT_OPSET, export_onnx_stages, onnx_stage_files  # noqa: E402
from models.dvt import DVT, run_early_exit  # noqa: E402
from utils.budget.thresholds import budget_exit_shares, find_thresholds  # noqa: E402
from utils.checkpoint import build_from_checkpoint, load_checkpoint_file  # noqa: E402
from utils.errors import CheckpointError, ConfigError, one_line  # noqa: E402
from utils.predict.onnx_runtime import load_steps, require_onnx_export, require_onnxruntime  # noqa: E402


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="DVT_Deit_small", help="registered DVT name (random seeded weights)")
    parser.add_argument("--checkpoint_path", default=None, help="weights to use instead (its own model and size)")
    parser.add_argument("--img-size", "--img_size", dest="img_size", type=int, default=224)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--images", type=int, default=64, help="timed images per way and iteration (default: 64)")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations; the best is kept (default: 5)")
    parser.add_argument("--threads", type=int, default=None, help="threads of torch and of every session "
                                                                  "(default: torch's)")
    parser.add_argument("--budget-index", type=int, default=20, help="budget row p (1..59) of the exit shares")
    parser.add_argument("--onnx", type=Path, default=None,
                        help="folder to export into and keep (default: a temporary one)")
    parser.add_argument("--reuse", action="store_true",
                        help="run the stages already in --onnx (exported from the same model, size and --seed) "
                             "instead of exporting")
    parser.add_argument("--providers", nargs="+", default=["cpu"], help="onnxruntime providers (default: cpu)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset of the export (default: {DEFAULT_OPSET}; 23 has a fused Attention op)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.batch_sizes) < 1 or args.images < 1 or args.iters < 1:
        parser.error("--batch-sizes, --images and --iters must be positive")
    if args.reuse and args.onnx is None:
        parser.error("--reuse needs --onnx DIR")
    return args


def seconds(fn: Callable[[torch.Tensor], object], batches: Sequence[torch.Tensor]) -> float:
    """Wall time of ``fn`` over every batch."""
    start = time.perf_counter()
    for x in batches:
        fn(x)
    return time.perf_counter() - start


def all_exits(steps: Sequence[Callable]) -> Callable[[torch.Tensor], list]:
    """Every stage on the whole batch, each fed the previous one's carry."""
    def run(x: torch.Tensor) -> list:
        carry, logits = (), []
        for step in steps:
            out = step(x, *carry)
            logits.append(out[0])
            carry = out[2:]
        return logits
    return run


@torch.no_grad()
def bench(args: argparse.Namespace, model: DVT, steps: Sequence[Callable]
          ) -> tuple[list[tuple[str, int, float, float]], list[float], int, list[float]]:
    """Rows (way, batch, PyTorch images/s, ONNX Runtime images/s); the exit shares of early exit,
    the number of images leaving at the same exit in both, and the thresholds."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    size = (3, model.img_size, model.img_size)
    calib = torch.randn(128, *size, generator=gen)
    conf = torch.cat([torch.stack(model(c)).softmax(-1).amax(-1) for c in calib.split(32)], dim=1)  # (E, N)
    thresholds = find_thresholds(conf, budget_exit_shares(args.budget_index, model.num_exits)[None])[0].float()
    images = torch.randn(args.images, *size, generator=gen)
    torch_steps = model.exit_steps()
    ways = {
        "all exits": (lambda x: model(x), all_exits(steps)),
        "early exit": (lambda x: run_early_exit(torch_steps, x, thresholds),
                       lambda x: run_early_exit(steps, x, thresholds)),
    }
    rows = []
    for batch in args.batch_sizes:
        batches = list(images.split(batch))
        for way, (eager, ort) in ways.items():
            eager(batches[0]), ort(batches[0])  # warm-up: allocators, first-run kernels
            best = [float("inf"), float("inf")]
            for _ in range(args.iters):
                for i, fn in enumerate((eager, ort)):
                    best[i] = min(best[i], seconds(fn, batches))
            rows.append((way, batch, args.images / best[0], args.images / best[1]))
    eager_out = run_early_exit(torch_steps, images, thresholds)
    ort_out = run_early_exit(steps, images, thresholds)
    shares = torch.bincount(eager_out.exit_index, minlength=model.num_exits).float() / args.images
    same = int((eager_out.exit_index == ort_out.exit_index).sum())
    return rows, shares.tolist(), same, thresholds.tolist()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        ort = require_onnxruntime()
        if not args.reuse:
            require_onnx_export()
        if args.threads:
            torch.set_num_threads(args.threads)
        threads = torch.get_num_threads()
        torch.manual_seed(args.seed)
        if args.checkpoint_path:
            model, _ = build_from_checkpoint(load_checkpoint_file(args.checkpoint_path), args.checkpoint_path)
        else:
            model = build_dvt(args.model, img_size=args.img_size)
        model = model.float().eval()
        with tempfile.TemporaryDirectory() as tmp:
            folder = args.onnx or Path(tmp)
            if args.reuse:
                paths = onnx_stage_files(folder, model.num_exits)
            else:
                start = time.perf_counter()
                example = torch.randn(2, 3, model.img_size, model.img_size)
                paths = export_onnx_stages(model, example, folder, args.opset)
                print(f"exported {len(paths)} stages in {time.perf_counter() - start:.0f} s", file=sys.stderr)
            steps = load_steps(paths, args.providers, threads)
            rows, shares, same, thresholds = bench(args, model, steps)
    except (CheckpointError, ConfigError, ValueError, OSError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1

    name = getattr(model, "model_name", args.model)
    print(f"{name}, {model.img_size} px, float32, opset {args.opset}, {args.images} random images per way, "
          f"best of {args.iters}; "
          f"early exit at budget row {args.budget_index}: thresholds "
          f"[{', '.join(f'{t:.4g}' for t in thresholds)}], exit shares [{', '.join(f'{s:.2f}' for s in shares)}], "
          f"same exits in ONNX Runtime for {same}/{args.images} images")
    print()
    print("| way | batch | PyTorch eager (img/s) | ONNX Runtime (img/s) | ORT / PyTorch |")
    print("|---|---:|---:|---:|---:|")
    for way, batch, eager, onnx in rows:
        print(f"| {way} | {batch} | {eager:.1f} | {onnx:.1f} | {onnx / eager:.2f}x |")
    print()
    print(f"machine: {machine_description(torch.device('cpu'))}")
    print(f"onnxruntime {ort.__version__}, providers {', '.join(steps[0].session.get_providers())}, "
          f"{threads} intra-op threads per session; load average at the end "
          f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print(f"command: python scripts/bench_onnx.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

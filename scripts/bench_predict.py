"""Benchmark: ``inference.py --predict`` on 1 and 2 processes against the data loading alone.

Where does the time of ``--predict`` go on this CPU? The same generated JPEGs (``--size``,
500x375 by default, as ImageNet's typical photo) are

* only loaded: read, decoded and transformed by the loader ``--predict`` uses (its batches, its
  ``--workers``), no model: the most any number of model processes could reach;
* classified by ``inference.py --predict`` in one process, with ``--threads`` torch threads and
  with one (on a small shared machine one thread is often faster: OpenMP threads wait for each
  other at every operation, and a loader worker or another job takes a core from them);
* classified by ``torchrun --nproc_per_node=2 inference.py --predict`` (threads split between
  the two processes).

The model has random seeded weights (``--model``, 224 px); without ``--thresholds`` every image
runs to the last exit (a checkpoint without a threshold table), the most model time per image.
The rates are images/second over the whole run of each command, as its summary line reports
them (listing, loading and the model, after the model is built). One table goes to stdout, with
the CPU (``torch.backends.cpu.get_cpu_capability()``) and the load average before and after.

Usage (from the repository root)::

    python scripts/bench_predict.py [--images 2000] [--model DVT_T2t_vit_12] [--batch-size 32]
        [--workers 1] [--threads 2] [--thresholds T1 T2] [--data DIR]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from benchmark import machine_description  # noqa: E402

from models import build_dvt  # noqa: E402
from utils.predict.classifier import DVTClassifier  # noqa: E402
from utils.predict.sources import stream_batches  # noqa: E402


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="JPEGs to generate (default: 2000)")
    parser.add_argument("--size", nargs=2, type=int, default=[500, 375], metavar=("W", "H"))
    parser.add_argument("--data", default=None, help="folder for the JPEGs (kept; default: a temporary one)")
    parser.add_argument("--model", default="DVT_T2t_vit_12", help="registered DVT (random seeded weights)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="loader processes per process (default: 1)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads in all: one process gets them all, two get half each")
    parser.add_argument("--thresholds", nargs="+", type=float, default=None,
                        help="exit thresholds for --predict (default: every image runs every exit)")
    return parser.parse_args(argv)


def write_jpegs(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> None:
    """``count`` photo-like JPEGs (smooth colour fields with noise) of ``size``, written once."""
    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.jpg"))) >= count:
        return
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(count):
        a, b, c = rng.uniform(0.005, 0.05, 3)
        base = np.stack([np.sin(xx * a + i), np.cos(yy * b), np.sin((xx + yy) * c)], -1) * 90 + 128
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:06d}.jpg", quality=90)


def save_checkpoint(name: str, path: Path) -> None:
    torch.manual_seed(0)
    model = build_dvt(name)
    torch.save({"model": model.state_dict(), "model_name": name,
                "model_kwargs": {"num_classes": model.num_classes, "img_size": model.img_size}}, path)


def loading_rate(checkpoint: Path, data: Path, batch_size: int, workers: int) -> float:
    """Images/second of the --predict loader alone (read, decode, transform)."""
    transform = DVTClassifier.from_checkpoint(checkpoint, device="cpu").transform
    start, count = time.perf_counter(), 0
    for batch in stream_batches([str(data)], transform, batch_size, workers):
        count += len(batch.paths)
    return count / (time.perf_counter() - start)


def predict_rate(procs: int, threads: int, args: argparse.Namespace, checkpoint: Path, data: Path,
                 out: Path) -> tuple[float, float]:
    """(images/second of the summary line, wall seconds of the command) of one --predict run."""
    head = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                f"--nproc_per_node={procs}"]
    cmd = [*head, str(REPO / "inference.py"), "--checkpoint_path", str(checkpoint), "--predict", str(data),
           "--output", str(out), "--overwrite", "--batch_size", str(args.batch_size), "--workers",
           str(args.workers), "--device", "cpu", "--no_progress"]
    if args.thresholds:
        cmd += ["--thresholds", *map(str, args.thresholds)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // procs)), "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rate = re.search(r"summary : .*, ([0-9.]+) img/s", proc.stderr)
    return float(rate.group(1)), wall


def load_average() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "jpegs"
        write_jpegs(data, args.images, tuple(args.size))
        checkpoint = Path(tmp) / "model.pth.tar"
        save_checkpoint(args.model, checkpoint)
        before = load_average()
        rows = [("loading alone (decode + transform)", loading_rate(checkpoint, data, args.batch_size, args.workers),
                 None)]
        for procs, threads in sorted({(1, args.threads), (1, 1), (2, args.threads)}):
            rate, wall = predict_rate(procs, threads, args, checkpoint, data, Path(tmp) / "preds.csv")
            per = max(1, threads // procs)
            name = f"--predict, {procs} process{'es' if procs > 1 else ''} x {per} thread{'s' if per > 1 else ''}"
            rows.append((name, rate, wall))
        after = load_average()
    exits = "thresholds " + " ".join(map(str, args.thresholds)) if args.thresholds else "every exit"
    print(f"{args.images} JPEGs of {args.size[0]}x{args.size[1]}, {args.model} (random weights, {exits}), "
          f"batch {args.batch_size}, {args.workers} loader worker(s) per process, "
          f"{args.threads} torch threads in all\n")
    print("| run | images/s | wall s |\n|---|---:|---:|")
    for name, rate, wall in rows:
        print(f"| {name} | {rate:.1f} | {'' if wall is None else f'{wall:.1f}'} |")
    print(f"\n{machine_description(torch.device('cpu'))}\nload average (1/5/15 min) before {before}, after {after}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

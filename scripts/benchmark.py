"""Inference throughput of the DVT cascades: every exit computed (the cost of the last exit).

    python scripts/benchmark.py                                  # all released models, fp32 and bf16
    python scripts/benchmark.py --models DVT_T2t_vit_12 --dtypes fp32 --batch 32 --json out.json

Prints one markdown row per (model, precision) with images/second, plus the command and
the machine, so that numbers in the README can be traced to a run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402

import models  # noqa: E402,F401  (registers the DVT models)

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def machine_description(device: torch.device) -> str:
    """The device and the software versions, for the line under a benchmark's table."""
    versions = f"torch {torch.__version__}, timm {timm.__version__}, python {platform.python_version()}"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {versions}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {versions}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def throughput(model: torch.nn.Module, batch: int, img_size: int, amp_dtype, device: torch.device,
               warmup: int, iters: int) -> float:
    """Images per second of ``model(x)`` (all exits), best of ``iters`` timed batches."""
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    ctx = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else torch.no_grad
    times = []
    for i in range(warmup + iters):
        _sync(device)
        start = time.perf_counter()
        with ctx():
            model(x)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return batch / min(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["DVT_T2t_vit_12", "DVT_T2t_vit_14", "DVT_Deit_small"])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON lines here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    print(f"command: python scripts/benchmark.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"machine: {machine_description(device)}")
    print(f"batch {args.batch}, {args.img_size}x{args.img_size}, all exits, best of {args.iters} after {args.warmup} warm-up\n")
    print("| model | precision | img/s |")
    print("|---|---|---:|")
    rows = []
    for name in args.models:
        model = timm.create_model(name).to(device).eval()
        for dtype in args.dtypes:
            ips = throughput(model, args.batch, args.img_size, DTYPES[dtype], device, args.warmup, args.iters)
            rows.append(dict(impl="this", model=name, dtype=dtype, batch=args.batch, img_per_s=ips))
            print(f"| {name} | {dtype} | {ips:.1f} |", flush=True)
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training throughput of a DVT cascade: forward of all exits, the summed per-exit loss,
backward and an AdamW step (the optimizer main.py builds), on random images.

    python scripts/bench_train.py                                # DVT_T2t_vit_12, 224px, batch 16
    python scripts/bench_train.py --dtypes float32 --threads 1 --iters 5

Prints the command, the machine and a markdown table of images/second (median over the
timed steps, after warm-up steps). For reference, the original implementation trains
DVT_T2t_vit_12 at 3.7 images/second on the 2-core CPU this project is developed on
(float32, batch 16).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402

import models  # noqa: E402,F401  (registers the DVT models)
from utils.precision import autocast_context  # noqa: E402
from utils.train.recipe import param_groups  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import machine_description  # noqa: E402

DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
ORIGINAL_IMG_PER_S = 3.7  # original code, DVT_T2t_vit_12, float32, batch 16, this project's 2-core CPU


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_steps(model_name: str, img_size: int, batch: int, amp_dtype, device: torch.device, warmup: int,
                iters: int, seed: int = 0) -> list[float]:
    """Seconds of each timed training step.

    Args:
        model_name: registered DVT model.
        img_size: input resolution.
        batch: images per step.
        amp_dtype: autocast dtype, or None for float32.
        device: where to run.
        warmup: untimed steps first.
        iters: timed steps.
        seed: weights, images and labels.
    """
    torch.manual_seed(seed)
    model = timm.create_model(model_name, img_size=img_size, drop_path_rate=0.1).to(device).train()
    optimizer = create_optimizer_v2(param_groups(model, 0.03), opt="adamw", lr=1e-4, weight_decay=0.03)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    images = torch.randn(batch, 3, img_size, img_size, device=device)
    targets = torch.randint(0, model.num_classes, (batch,), device=device)
    times = []
    for i in range(warmup + iters):
        sync(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast_context(device, amp_dtype):
            outputs = model(images)
        loss = sum(F.cross_entropy(out.float(), targets, label_smoothing=0.1) for out in outputs)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="DVT training throughput (forward + backward + AdamW step).")
    parser.add_argument("--model", default="DVT_T2t_vit_12")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=tuple(DTYPES))
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps")
    parser.add_argument("--iters", type=int, default=5, help="timed steps")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default=None, help="default: cuda when available")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and "float16" in args.dtypes:
        parser.error("float16 autocast is benchmarked on CUDA only; use bfloat16 on the CPU")

    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {machine_description(device)}")
    print(f"work: {args.model} at {args.img_size}px, batch {args.batch_size}, all exits, summed loss, backward, "
          f"AdamW step; {args.warmup} warm-up + {args.iters} timed steps, median")
    print()
    print("| model | precision | batch | s/step (median) | img/s | vs reference 3.7 img/s (original, float32) |")
    print("|---|---|---|---|---|---|")
    for name in args.dtypes:
        times = train_steps(args.model, args.img_size, args.batch_size, DTYPES[name], device, args.warmup, args.iters)
        median = statistics.median(times)
        rate = args.batch_size / median
        ratio = f"{rate / ORIGINAL_IMG_PER_S:.2f}x" if device.type == "cpu" else "n/a (other machine)"
        print(f"| {args.model} | {name} | {args.batch_size} | {median:.3f} | {rate:.2f} | {ratio} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak training memory and step time with and without gradient checkpointing.

Each setting runs in its own process (peak RSS, ``resource.getrusage``, only grows): build the
model and AdamW, run ``--steps`` training steps (all exits, summed loss, backward, optimizer
step) on random images, and report the peak RSS before the first step, after the steps, and
the difference (what training adds: activations, gradients, optimizer state).

    python scripts/bench_grad_checkpointing.py --model DVT_T2t_vit_12 --batch-size 16
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import timm  # noqa: E402
from benchmark import machine_description  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402

import models  # noqa: E402,F401  (registers the DVT models)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(model_name: str, batch: int, img_size: int, steps: int, checkpointing: bool) -> dict:
    """One setting, in this process: peak RSS (MiB) before and after training, seconds per step."""
    torch.manual_seed(0)
    model = timm.create_model(model_name, img_size=img_size, drop_path_rate=0.1).train()
    model.set_grad_checkpointing(checkpointing)
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-4, weight_decay=0.05)
    images = torch.randn(batch, 3, img_size, img_size)
    targets = torch.randint(0, model.num_classes, (batch,))
    before = peak_rss_mib()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = sum(torch.nn.functional.cross_entropy(out, targets) for out in model(images))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    after = peak_rss_mib()
    return dict(before_mib=before, peak_mib=after, training_mib=after - before, step_s=min(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="DVT_T2t_vit_12")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--one", choices=("off", "on"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:  # child process: one setting
        print(json.dumps(measure(args.model, args.batch_size, args.img_size, args.steps, args.one == "on")))
        return

    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {machine_description(torch.device('cpu'))}, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}")
    rows = {}
    for setting in ("off", "on"):
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", setting],
                               check=True, capture_output=True, text=True)
        rows[setting] = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"\n{args.model}, batch {args.batch_size}, {args.img_size}px, float32, AdamW, {args.steps} steps")
    print("| grad checkpointing | peak RSS before training | peak RSS | added by training | s/step |")
    print("|---|---:|---:|---:|---:|")
    for setting, r in rows.items():
        print(f"| {setting} | {r['before_mib']:,.0f} MiB | {r['peak_mib']:,.0f} MiB | {r['training_mib']:,.0f} MiB "
              f"| {r['step_s']:.2f} |")
    off, on = rows["off"], rows["on"]
    print(f"\nmemory added by training: {on['training_mib'] / off['training_mib']:.2f}x with checkpointing; "
          f"step time {on['step_s'] / off['step_s']:.2f}x")


if __name__ == "__main__":
    main()

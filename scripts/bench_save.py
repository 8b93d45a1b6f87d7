"""Time the checkpoint writes of a training run for one model on this machine.

    python scripts/bench_save.py --model DVT_Vit_base_49_196 --folder /tmp/save_bench

Builds the model (random weights, no data), an AdamW state with both moments filled and an EMA
copy, then times: the atomic save of that whole training state (``torch.save`` to a temporary
file, fsync, rename), a best copy made by a hard link, and one made by a byte copy (another
file system), each fsync'd and renamed into place.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402

import models  # noqa: E402,F401  (registers the DVT models)
from utils.checkpoint.files import (
    atomic_copy,  # noqa: E402
    atomic_save,  # noqa: E402
)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="DVT_Vit_base_49_196")
    p.add_argument("--folder", default="output/save_bench", help="where the files are written (then removed)")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)

    model = timm.create_model(args.model, num_classes=1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()  # creates both moments for every parameter
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    state = {"model": model.state_dict(), "model_ema": ema, "optimizer": optimizer.state_dict(), "epoch": 1}

    last, best = folder / "last.pth.tar", folder / "best.pth.tar"
    times: dict[str, list[float]] = {"save": [], "hard link": [], "byte copy": []}
    for _ in range(args.repeats):
        started = time.perf_counter()
        atomic_save(state, last)
        times["save"].append(time.perf_counter() - started)
        started = time.perf_counter()
        atomic_copy(last, best)
        times["hard link"].append(time.perf_counter() - started)
        started = time.perf_counter()
        atomic_copy(last, best, link=False)
        times["byte copy"].append(time.perf_counter() - started)
    size = last.stat().st_size
    for path in (last, best):
        path.unlink()
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {params / 1e6:.1f}M parameters; checkpoint with AdamW state and EMA: "
          f"{size / 2 ** 30:.2f} GiB")
    for name, values in times.items():
        print(f"  {name:<10} best of {len(values)}: {min(values):7.2f} s")
    print(f"  machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.backends.cpu.get_cpu_capability()}; folder {folder.resolve()}")


if __name__ == "__main__":
    main()

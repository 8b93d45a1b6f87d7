"""Per-exit computational cost of a DVT cascade, counted from the model itself."""
from __future__ import annotations

import itertools

import torch
from torch.utils.flop_counter import FlopCounterMode

from models.layers import GridResample


def stage_gmacs(model: torch.nn.Module, img_size: int = 224, include_resample: bool = False) -> list[float]:
    """GMACs (multiply-adds) of each stage alone for one image.

    Every matrix product, linear layer, convolution and attention is counted (FLOP counter
    convention: 1 MAC = 2 FLOPs). The grid resampling of the reuse paths is left out unless
    ``include_resample``: in the original implementation it is a nearest upsample and an
    average pool, which FLOP counters do not count as multiply-adds; here it is a small
    matrix product.
    """
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    x = torch.zeros(1, 3, img_size, img_size, device=param.device, dtype=param.dtype)
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    counts = counter.get_flop_counts()
    root = type(model).__name__

    def total(name: str) -> int:
        return sum(counts.get(f"{root}.{name}", {}).values())

    macs = []
    for k, stage in enumerate(model.stages):
        flops = total(f"stages.{k}")
        if not include_resample:
            flops -= sum(total(f"stages.{k}.{n}") for n, m in stage.named_modules() if isinstance(m, GridResample))
        macs.append(flops / 2e9)
    return macs


def exit_gflops(model: torch.nn.Module, img_size: int = 224, include_resample: bool = False) -> list[float]:
    """Cumulative GFLOPs (multiply-adds, the paper's convention) of exiting at each exit:
    exit k pays for stages 1..k."""
    return list(itertools.accumulate(stage_gmacs(model, img_size, include_resample)))

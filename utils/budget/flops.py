"""Per-exit computational cost of a DVT cascade, counted from the model itself (or, by
:func:`exit_costs`, read from a checkpoint that stores it).

The count depends only on the architecture and the input size. It is taken on a float32 CPU
copy of the model with every attention on its explicit path. Counting the model as it runs
would depend on the installed torch and on the device: FLOP counters have formulas for some
fused attention kernels and not for others (torch's CPU kernel counts as zero), and the model
picks its kernel by device, dtype and mode.
"""
from __future__ import annotations

import copy
import itertools

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from models.layers import GridResample

from ..errors import CheckpointError
from .choice import as_plain


def counting_copy(model: nn.Module) -> nn.Module:
    """A float32 copy of ``model`` on the CPU, in eval mode, with every attention set to its
    explicit path (``fused_attn = False``) and every stage's relation reuse on its reference
    products (``cpu_kernels = False``). Its parameters and buffers are zeros of the same
    shapes: the model's own values are neither needed nor copied.

    Args:
        model: any module (not wrapped by DDP or ``torch.compile``), on any device and dtype.
    """
    memo: dict[int, torch.Tensor] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        zeros = torch.zeros(t.shape, dtype=torch.float32 if t.is_floating_point() else t.dtype, device="cpu")
        memo[id(t)] = nn.Parameter(zeros, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else zeros
    clone = copy.deepcopy(model, memo)
    for m in clone.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
        if hasattr(m, "cpu_kernels"):
            m.cpu_kernels = False
    return clone.eval()


def stage_gmacs(model: torch.nn.Module, img_size: int = 224, include_resample: bool = False) -> list[float]:
    """GMACs (multiply-adds) of each stage alone for one image.

    Every matrix product, linear layer, convolution and attention product is counted (FLOP
    counter convention: 1 MAC = 2 FLOPs), on a :func:`counting_copy` of the model, so the
    result is the same on every device, dtype, attention kernel and torch version. The grid
    resampling of the reuse paths is left out unless ``include_resample``: in the original
    implementation it is a nearest upsample and an average pool, which FLOP counters do not
    count as multiply-adds; here it is a small matrix product.

    Args:
        model: a DVT cascade (``model.stages``), unwrapped.
        img_size: input resolution.
        include_resample: also count the grid resampling products.
    """
    clone = counting_copy(model)
    x = torch.zeros(1, 3, img_size, img_size)
    counter = FlopCounterMode(display=False)
    # Autocast left on by a caller would not change the count, only slow it down.
    with torch.no_grad(), torch.autocast("cpu", enabled=False), counter:
        clone(x)
    counts = counter.get_flop_counts()
    root = type(model).__name__

    def total(name: str) -> int:
        return sum(counts.get(f"{root}.{name}", {}).values())

    macs = []
    for k, stage in enumerate(clone.stages):
        flops = total(f"stages.{k}")
        if not include_resample:
            flops -= sum(total(f"stages.{k}.{n}") for n, m in stage.named_modules() if isinstance(m, GridResample))
        macs.append(flops / 2e9)
    return macs


def exit_gflops(model: torch.nn.Module, img_size: int = 224, include_resample: bool = False) -> list[float]:
    """Cumulative GFLOPs (multiply-adds, the paper's convention) of exiting at each exit:
    exit k pays for stages 1..k. Arguments as :func:`stage_gmacs`."""
    return list(itertools.accumulate(stage_gmacs(model, img_size, include_resample)))


def exit_costs(model: nn.Module, checkpoint: dict, source: str) -> tuple[list[float], str]:
    """Cumulative GFLOPs per exit: the checkpoint's ``flops``, else counted on the model
    (:func:`exit_gflops` at its image size); and which of the two, ``"checkpoint"`` or ``"counted"``."""
    if "flops" not in checkpoint:
        return exit_gflops(model, model.img_size), "counted"
    flops = as_plain(checkpoint["flops"])
    if not isinstance(flops, list) or len(flops) != model.num_exits:
        raise CheckpointError(f"{source}: 'flops' must list one cumulative GFLOPs value per exit "
                              f"({model.num_exits}), got {flops!r}")
    return [float(f) for f in flops], "checkpoint"

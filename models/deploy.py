"""Compiling and exporting a DVT cascade for deployment.

* :func:`compile_model`: ``torch.compile`` of the all-exit forward, one graph for every batch
  size from 2 up (the batch dimension is dynamic from the first call), one more for a batch
  of one.
* :func:`compile_stages`: one compiled graph per stage (:class:`models.dvt.ExitStep`), with
  a dynamic batch, for real early exit: the stages see a different number of samples on
  every call. The selection of the samples that go on runs eagerly between the stages.
* :func:`export_stages` / :func:`save_stages` / :func:`load_stages`: the same stages as
  ``torch.export`` programs with a dynamic batch, written to and read from ``.pt2`` files,
  and run with ``model.forward_early_exit(x, thresholds, steps=...)`` or
  :func:`models.dvt.run_early_exit`, which need no model code at all.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
from torch.export import Dim, ExportedProgram

from .dvt import DVT

__all__ = ["CompiledCascade", "compile_model", "compile_stages", "export_stages", "save_stages", "load_stages",
           "stage_files"]

Step = Callable[..., tuple[torch.Tensor, ...]]


class _DynamicBatch:
    """Calls a compiled function with dimension 0 of every tensor argument marked dynamic, so
    that the first call already compiles one graph for every batch size of 2 or more (an
    unmarked call would compile again on the first new size). The compiler specialises
    sizes 0 and 1: a batch of one gets a graph of its own, compiled once."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        for a in args:
            if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] > 1:
                torch._dynamo.maybe_mark_dynamic(a, 0)
        return self.fn(*args)


def compile_model(model: nn.Module, **compile_kwargs) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
    """``torch.compile`` of ``model(x)`` with a dynamic batch dimension.

    Args:
        model: a DVT cascade (or any module taking one batch of images).
        compile_kwargs: passed to ``torch.compile`` (``mode``, ``backend``, ...).
    """
    return _DynamicBatch(torch.compile(model, **compile_kwargs))


def compile_stages(model: DVT, **compile_kwargs) -> list[Step]:
    """One compiled graph per stage for ``model.forward_early_exit(x, thresholds, steps=...)``.

    Args:
        model: a DVT cascade in eval mode.
        compile_kwargs: passed to ``torch.compile``.
    """
    return [_DynamicBatch(torch.compile(step, **compile_kwargs)) for step in model.exit_steps()]


@torch.no_grad()
def export_stages(model: DVT, example: torch.Tensor, max_batch: int = 4096) -> list[ExportedProgram]:
    """``torch.export`` of every stage (:class:`models.dvt.ExitStep`) with a dynamic batch.

    Args:
        model: a DVT cascade in eval mode, in the dtype and on the device to deploy.
        example: example images (B, 3, H, W), B >= 2; H and W are fixed by it.
        max_batch: the largest batch the programs accept.
    """
    if example.dim() != 4 or example.shape[0] < 2:
        raise ValueError(f"example images must be (B >= 2, 3, H, W), got {tuple(example.shape)}")
    batch = Dim("batch", min=1, max=max_batch)
    programs, carry = [], ()
    for step in model.exit_steps():
        args = (example,) + carry
        dynamic = ({0: batch}, tuple({0: batch} for _ in carry)) if carry else ({0: batch},)  # (x, *carry)
        programs.append(torch.export.export(step, args, dynamic_shapes=dynamic))
        carry = tuple(step(*args)[2:])
    return programs


def stage_files(folder: str | Path, num_exits: int) -> list[Path]:
    """Paths of the exported stages in ``folder``: ``stage0.pt2``, ``stage1.pt2``, ..."""
    return [Path(folder) / f"stage{k}.pt2" for k in range(num_exits)]


def save_stages(programs: Sequence[ExportedProgram], folder: str | Path) -> list[Path]:
    """Write exported stages to ``folder`` (created if needed); returns the paths."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    paths = stage_files(folder, len(programs))
    for program, path in zip(programs, paths):
        torch.export.save(program, path)
    return paths


def load_stages(folder: str | Path) -> list[Step]:
    """Exported stages read back from ``folder`` as callables for
    :func:`models.dvt.run_early_exit` (stage0.pt2, stage1.pt2, ... in order)."""
    paths = []
    while (path := Path(folder) / f"stage{len(paths)}.pt2").is_file():
        paths.append(path)
    if not paths:
        raise FileNotFoundError(f"no exported stages (stage0.pt2, ...) in {folder}")
    return [torch.export.load(p).module() for p in paths]



class CompiledCascade:
    """A DVT cascade whose all-exit forward and early-exit stages run compiled (dynamic batch).

    It stands in for the model where only running it matters: ``cascade(x)``,
    ``cascade.forward_early_exit(x, thresholds)`` and ``cascade.early_exit_stream(thresholds)``
    (:class:`models.dvt.EarlyExitStream`) give the eager results; every other
    attribute is the model's. Graphs are compiled on first use.

    Args:
        model: a DVT cascade in eval mode, on its device.
        compile_kwargs: passed to ``torch.compile``.
    """

    def __init__(self, model: nn.Module, **compile_kwargs) -> None:
        self.model = model
        self._forward = compile_model(model, **compile_kwargs)
        # single-exit baselines have no stages to compile: their early exit stays eager
        self._steps = compile_stages(model, **compile_kwargs) if hasattr(model, "exit_steps") else None

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._forward(x)

    def forward_early_exit(self, x: torch.Tensor, thresholds: Sequence[float] | torch.Tensor):
        if self._steps is None:
            return self.model.forward_early_exit(x, thresholds)
        return self.model.forward_early_exit(x, thresholds, steps=self._steps)

    def early_exit_stream(self, thresholds: Sequence[float] | torch.Tensor, queue: Optional[int] = None):
        return self.model.early_exit_stream(thresholds, queue, steps=self._steps)

    def __getattr__(self, name: str):
        return getattr(self.model, name)

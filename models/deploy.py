"""Compiling and exporting a DVT cascade for deployment.

* :func:`compile_model`: ``torch.compile`` of the all-exit forward, one graph for every batch
  size from 2 up (the batch dimension is dynamic from the first call), one more for a batch
  of one.
* :func:`compile_stages`: one compiled graph per stage (:class:`models.dvt.ExitStep`), with
  a dynamic batch, for real early exit: the stages see a different number of samples on
  every call. The selection of the samples that go on runs eagerly between the stages.
* On the CPU a T2T cascade's tokens-to-token embeddings run eagerly before the compiled graphs,
  which start from their tokens (:class:`_EagerEmbeddings`).
* ``freeze=True`` (both, and :class:`CompiledCascade`): inductor's freezing, for a model that
  no longer changes: the graphs hold the weights as constants, cast, folded and laid out for
  their kernels once (see :class:`FrozenWeights`).
* :func:`export_stages` / :func:`save_stages` / :func:`load_stages`: the same stages as
  ``torch.export`` programs with a dynamic batch, written to and read from ``.pt2`` files,
  and run with ``model.forward_early_exit(x, thresholds, steps=...)`` or
  :func:`models.dvt.run_early_exit`, which need no model code at all.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch._inductor.config as inductor_config
import torch.nn as nn
from torch.export import Dim, ExportedProgram
from torch.multiprocessing.reductions import StorageWeakRef

from .dvt import DVT, ExitStep, T2TStage
from .layers import optimizer_steps, same_storages, storage_refs, tensor_state

__all__ = ["CompiledCascade", "FrozenWeights", "compile_model", "compile_stages", "export_stages", "save_stages",
           "load_stages", "stage_files"]

Step = Callable[..., tuple[torch.Tensor, ...]]


class _DynamicBatch:
    """Calls a compiled function with dimension 0 of every tensor argument marked dynamic, so
    that the first call already compiles one graph for every batch size of 2 or more (an
    unmarked call would compile again on the first new size). The compiler specialises
    sizes 0 and 1: a batch of one gets a graph of its own, compiled once. With ``frozen``
    (:class:`FrozenWeights`), every call first checks that the weights frozen into the graphs
    are still the module's."""

    def __init__(self, fn: Callable, frozen: Optional["FrozenWeights"] = None) -> None:
        self.fn = fn
        self.frozen = frozen

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        for a in args:
            if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] > 1:
                torch._dynamo.maybe_mark_dynamic(a, 0)
        if self.frozen is None:
            return self.fn(*args)
        self.frozen.check()
        # read while the call traces and compiles (inductor's `options` come too late for dynamo)
        with inductor_config.patch(freezing=True):
            return self.fn(*args)


class FrozenWeights:
    """The weights that inductor's freezing makes constants of a module's compiled graphs, and a
    check that they have not changed since: a graph compiled with ``freezing`` keeps the values
    its first call read, so a later ``load_state_dict``, ``module.to(...)``, in-place write or
    optimizer step would go unseen and the graphs would answer with the old weights.
    :meth:`check` raises instead.

    Freezing is for inference (graphs compiled with gradients on are not frozen) and for
    inductor; on CPUs it lets inductor fold the bfloat16 casts of the weights (under autocast)
    and pack them for oneDNN once, as the eager model does (:func:`models.layers.packed_weight`).
    """

    def __init__(self, module: nn.Module) -> None:
        self.tensors = list(itertools.chain(module.parameters(), module.buffers()))
        self.seen: Optional[list] = None
        self.storages: list[StorageWeakRef] = []

    def _state(self) -> list:
        """The optimizer steps taken, and each tensor's :func:`models.layers.tensor_state`."""
        return [optimizer_steps()] + [tensor_state(t) for t in self.tensors]

    def check(self) -> None:
        """Record the weights on the first call; raise ``RuntimeError`` when they have changed since
        (in place, or in other storage: :func:`models.layers.same_storages`), as the eager model's
        kept weights are told changed (:func:`models.layers.packed_weight`)."""
        state = self._state()
        if self.seen is None:
            self.seen = state
            self.storages = storage_refs(self.tensors)
        elif state != self.seen or not same_storages(self.storages, self.tensors):
            raise RuntimeError("the model's weights changed after its graphs were compiled with freeze=True, which "
                               "keeps the weights of the first call: compile the model again (a new CompiledCascade)")


def _compile(fn: nn.Module, freeze: bool, compile_kwargs: dict[str, Any]) -> _DynamicBatch:
    """``torch.compile(fn, **compile_kwargs)`` with a dynamic batch; with ``freeze``, inductor's
    freezing and the weights' check (:class:`FrozenWeights`)."""
    if freeze and compile_kwargs.get("backend", "inductor") != "inductor":
        raise ValueError(f"freeze=True is inductor's freezing; backend {compile_kwargs['backend']!r} has none")
    return _DynamicBatch(torch.compile(fn, **compile_kwargs), FrozenWeights(fn) if freeze else None)


class _FromTokens(nn.Module):
    """``module.from_tokens`` as a module's forward: what is compiled when the patch embeddings
    run outside the graph (:class:`_EagerEmbeddings`)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.module.from_tokens(*args)


class _EagerEmbeddings:
    """A compiled DVT forward or :class:`models.dvt.ExitStep` whose T2T embeddings run eagerly on
    the CPU, before the compiled rest of the graph (``module.embed_images``, then
    ``module.from_tokens``): inductor's code for the tokens-to-token module (the soft splits'
    gathers, the Performer's float32 features) took 1.3-2.2x the eager embedding's time at one
    and at 16 images, and a first stage of DVT_T2t_vit_14 compiled so ran 1.13x (bf16, one image)
    and 1.19-1.34x (fp32 and bf16, 16 images) faster than compiled whole (2 cores, AVX-512).
    On other devices the whole module is compiled. Same results up to rounding."""

    def __init__(self, module: nn.Module, freeze: bool, compile_kwargs: dict[str, Any]) -> None:
        self.module = module
        self.whole = _compile(module, freeze, compile_kwargs)
        self.rest = _compile(_FromTokens(module), freeze, compile_kwargs)

    def __call__(self, x: torch.Tensor, *carry: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.device.type != "cpu":
            return self.whole(x, *carry)
        return self.rest(*self.module.embed_images(x), *carry)


def _compile_cascade_part(module: nn.Module, freeze: bool,
                          compile_kwargs: dict[str, Any]) -> Callable[..., tuple[torch.Tensor, ...]]:
    """:func:`_compile` of a DVT forward or stage step; T2T embeddings stay eager on the CPU
    (:class:`_EagerEmbeddings`)."""
    stages = module.stages if isinstance(module, DVT) else [module.stage] if isinstance(module, ExitStep) else []
    if any(isinstance(stage, T2TStage) for stage in stages):
        return _EagerEmbeddings(module, freeze, compile_kwargs)
    return _compile(module, freeze, compile_kwargs)


def compile_model(model: nn.Module, freeze: bool = False,
                  **compile_kwargs) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
    """``torch.compile`` of ``model(x)`` with a dynamic batch dimension.

    Args:
        model: a DVT cascade (or any module taking one batch of images).
        freeze: inductor's freezing, for inference with weights that no longer change
            (:class:`FrozenWeights`).
        compile_kwargs: passed to ``torch.compile`` (``mode``, ``backend``, ...).
    """
    return _compile_cascade_part(model, freeze, compile_kwargs)


def compile_stages(model: DVT, freeze: bool = False, **compile_kwargs) -> list[Step]:
    """One compiled graph per stage for ``model.forward_early_exit(x, thresholds, steps=...)``.

    Args:
        model: a DVT cascade in eval mode.
        freeze: as in :func:`compile_model`.
        compile_kwargs: passed to ``torch.compile``.
    """
    return [_compile_cascade_part(step, freeze, compile_kwargs) for step in model.exit_steps()]


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
    ``cascade.forward_early_exit(x, thresholds)``, ``cascade.queued_early_exit(batches, thresholds)``
    and ``cascade.early_exit_stream(thresholds)`` (:class:`models.dvt.EarlyExitStream`) give the
    eager results (on the compiled stages, unless ``steps`` names others); every other
    attribute is the model's. Graphs are compiled on first use.

    Args:
        model: a DVT cascade in eval mode, on its device.
        freeze: inductor's freezing, for a model whose weights no longer change
            (:class:`FrozenWeights`): what ``inference.py --compile`` runs.
        compile_kwargs: passed to ``torch.compile``.
    """

    def __init__(self, model: nn.Module, freeze: bool = False, **compile_kwargs) -> None:
        self.model = model
        self._forward = compile_model(model, freeze, **compile_kwargs)
        self._steps = compile_stages(model, freeze, **compile_kwargs) if hasattr(model, "exit_steps") else None

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._forward(x)

    def forward_early_exit(self, x: torch.Tensor, thresholds: Sequence[float] | torch.Tensor,
                           steps: Optional[Sequence[Step]] = None):
        if self._steps is None:  # a single-exit baseline: its early exit stays eager
            return self.model.forward_early_exit(x, thresholds)
        return self.model.forward_early_exit(x, thresholds, steps=steps or self._steps)

    def queued_early_exit(self, batches, thresholds: Sequence[float] | torch.Tensor, queue: Optional[int] = None,
                          steps: Optional[Sequence[Step]] = None):
        return self.model.queued_early_exit(batches, thresholds, queue, steps=steps or self._steps)

    def early_exit_stream(self, thresholds: Sequence[float] | torch.Tensor, queue: Optional[int] = None,
                          steps: Optional[Sequence[Step]] = None):
        return self.model.early_exit_stream(thresholds, queue, steps=steps or self._steps)

    def __getattr__(self, name: str):
        return getattr(self.model, name)

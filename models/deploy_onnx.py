"""ONNX export of the stages of a DVT cascade, for real early exit in ONNX Runtime.

Each stage (:class:`models.dvt.ExitStep`) is captured by ``torch.export`` with a dynamic batch,
as for the ``.pt2`` programs of :func:`models.deploy.export_stages`, and translated to ONNX by
``torch.onnx.export(..., dynamo=True)`` (needs the ``onnx`` and ``onnxscript`` packages of
requirements-deploy.txt). The selection of the samples that go on
stays outside the graphs: :func:`models.dvt.run_early_exit` runs between the stages, whatever
runs the stages. The inputs and outputs have stable names (:func:`stage_input_names`,
:func:`stage_output_names`) and a dynamic first dimension named ``batch``.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import torch

from torch.export import Dim

from .dvt import DVT

__all__ = ["DEFAULT_OPSET", "export_onnx_stages", "onnx_stage_files", "stage_input_names", "stage_output_names"]

DEFAULT_OPSET = 18  # the opset of torch.onnx's own operator library; onnxruntime >= 1.14 runs it


def stage_input_names(prev_carry: Sequence[str]) -> list[str]:
    """Input names of a stage whose previous step hands on ``prev_carry`` (its
    :attr:`ExitStep.carry_names <models.dvt.ExitStep.carry_names>`): ``images``, then each
    of those with ``prev_`` before it (``prev_block_tokens``, ``prev_block_qkv``, ...)."""
    return ["images"] + [f"prev_{name}" for name in prev_carry]


def stage_output_names(carry: Sequence[str]) -> list[str]:
    """Output names of a stage that hands on ``carry`` (empty for the last stage):
    ``logits``, ``confidence``, then ``carry``."""
    return ["logits", "confidence"] + list(carry)


def onnx_stage_files(folder: str | Path, num_exits: int) -> list[Path]:
    """Paths of the ONNX stages in ``folder``: ``stage0.onnx``, ``stage1.onnx``, ..."""
    return [Path(folder) / f"stage{k}.onnx" for k in range(num_exits)]


@torch.no_grad()
def export_onnx_stages(model: DVT, example: torch.Tensor, folder: str | Path, opset: int = DEFAULT_OPSET,
                       max_batch: int = 4096) -> list[Path]:
    """Write every stage of ``model`` to ``folder`` as ``stage{k}.onnx`` with a dynamic batch.

    Args:
        model: a float32 DVT cascade in eval mode, on the CPU.
        example: example images (B >= 2, 3, H, W); H and W are fixed by it.
        folder: created if needed.
        opset: ONNX opset version.
        max_batch: the largest batch the graphs are exported for (ONNX Runtime itself does
            not enforce it).

    Returns:
        The paths written, one per stage.
    """
    if example.dim() != 4 or example.shape[0] < 2:
        raise ValueError(f"example images must be (B >= 2, 3, H, W), got {tuple(example.shape)}")
    Path(folder).mkdir(parents=True, exist_ok=True)
    paths = onnx_stage_files(folder, model.num_exits)
    batch = Dim("batch", min=1, max=max_batch)
    carry: Sequence[torch.Tensor] = ()
    carry_names: Sequence[str] = ()
    for step, path in zip(model.exit_steps(), paths):
        step.eval()  # the wrapper's own flag; the stage is already in eval mode
        args = (example,) + tuple(carry)
        outputs = step(*args)
        dynamic = ({0: batch}, tuple({0: batch} for _ in carry)) if carry else ({0: batch},)  # (x, *carry)
        with warnings.catch_warnings():
            # every dynamic dimension is the one batch: the exporter says it keeps one name for them
            warnings.filterwarnings("ignore", message=".*shares the same shape constraints.*")
            onnx_program = torch.onnx.export(
                step, args, dynamo=True, dynamic_shapes=dynamic, opset_version=opset, verbose=False,
                input_names=stage_input_names(carry_names), output_names=stage_output_names(step.carry_names))
        onnx_program.save(path, external_data=False)
        carry, carry_names = outputs[2:], step.carry_names
    return paths

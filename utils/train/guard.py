"""Training steps that survive a non-finite loss, without a host synchronisation per step.

A step whose loss is NaN or infinite on any rank (or, with fp16, whose gradients overflow) is
skipped on every rank: the weights and the optimizer state stay as they were. The decision
stays on the device:

* the loss's finiteness is all-reduced (a device collective, not a host read) and handed to
  the optimizer as ``found_inf``, which the fused AdamW/Adam/SGD kernels honour on the device
  (the same mechanism ``torch.amp.GradScaler`` uses); other optimizers read the flag on the
  host, one synchronisation per step;
* with a GradScaler, its own overflow check skips the step, and a lowered scale counts it;
* the skip counters are device tensors, read with the stop flag and the unreadable-image count
  in one small all-reduce at log intervals (:meth:`StepGuard.sync`).

The run stops (:class:`NonFiniteLossError`) once ``max_bad_steps`` steps in a row were skipped;
checkpoints are only written after such a check, so the last good one is never replaced.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ..errors import ConfigError
from ..run.distributed import DistEnv, all_reduce_

_logger = logging.getLogger("dvt.train")
FUSED_OPTIMIZERS = ("adam", "adamw", "sgd", "momentum", "nesterov")


class NonFiniteLossError(RuntimeError):
    """Too many training steps in a row had a NaN or infinite loss."""


def parse_injections(specs: Sequence[str]) -> set[tuple[int, int, int]]:
    """``EPOCH:STEP`` (every rank) or ``EPOCH:STEP@RANK`` strings as (epoch, step, rank or -1)."""
    out = set()
    for spec in specs:
        m = re.fullmatch(r"(\d+):(\d+)(?:@(\d+))?", spec.strip())
        if not m:
            raise ConfigError(f"--inject-nonfinite {spec!r}: expected EPOCH:STEP or EPOCH:STEP@RANK, e.g. 1:0@1")
        out.add((int(m[1]), int(m[2]), int(m[3]) if m[3] is not None else -1))
    return out


def fused_kwargs(opt: str) -> dict[str, Any]:
    """Optimizer arguments that let a skipped step stay on the device (fused kernels take the
    skip flag), for the torch optimizers that have a fused implementation."""
    return {"fused": True} if opt.lower() in FUSED_OPTIMIZERS else {}


@dataclass
class SyncResult:
    """What every rank learns at a synchronisation point."""
    stop: bool
    bad_images: int
    skipped: int
    worst_run: int


class StepGuard:
    """Device-side bookkeeping of skipped steps (see the module docstring).

    Args:
        env: this process's rank and device.
        max_bad_steps: stop after this many skipped steps in a row (0: never stop).
        inject: (epoch, step, rank or -1) of steps whose loss is made NaN (testing the handling).
    """

    def __init__(self, env: DistEnv, max_bad_steps: int = 10, inject: Sequence[tuple[int, int, int]] = ()) -> None:
        self.env = env
        self.max_bad_steps = max_bad_steps
        self.inject = set(inject)
        # skipped steps, current run of skipped steps, longest run, epoch and step of the last skip
        self.counts = torch.zeros(5, dtype=torch.float64, device=env.device)
        self.reported = 0

    def poison(self, losses: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        """``losses`` made NaN when (epoch, step) is an injected step for this rank."""
        if (epoch, step, -1) in self.inject or (epoch, step, self.env.rank) in self.inject:
            return losses * float("nan")
        return losses

    def loss_flag(self, loss: torch.Tensor) -> torch.Tensor:
        """1.0 when the loss is not finite on some rank, else 0.0 (float32 scalar on the device)."""
        flag = (~torch.isfinite(loss.detach())).float().reshape(1)
        return all_reduce_(flag, "max").reshape(())

    def optimizer_step(self, optimizer: torch.optim.Optimizer, bad: torch.Tensor) -> None:
        """``optimizer.step()``, skipped when ``bad`` is 1: on the device for fused optimizers."""
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            optimizer.found_inf = bad.to(torch.float32)
            optimizer.grad_scale = None
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf, optimizer.grad_scale
        elif not bool(bad):  # a host read: optimizers without a fused kernel
            optimizer.step()

    def record(self, bad: torch.Tensor, epoch: int, step: int) -> None:
        """Count a step (``bad`` 1.0 if it was skipped), on the device."""
        bad = bad.to(self.counts.dtype)
        c = self.counts
        run = (c[1] + 1) * bad
        position = torch.tensor([float(epoch), float(step)], dtype=c.dtype, device=c.device)
        self.counts = torch.cat([
            (c[0] + bad).reshape(1), run.reshape(1), torch.maximum(c[2], run).reshape(1),
            torch.where(bad > 0, position, c[3:5])])

    def sync(self, stop_requested: bool, bad_images: int = 0) -> SyncResult:
        """One all-reduce: the stop flag of any rank, the unreadable images of all ranks, the
        skip counters; logs the steps skipped since the last call and raises
        :class:`NonFiniteLossError` when the longest run of skipped steps reached the limit."""
        world = max(self.env.world_size, 1)
        local = torch.cat([torch.tensor([float(stop_requested), float(bad_images)], dtype=self.counts.dtype,
                                        device=self.counts.device), self.counts[:3] / world])
        stop, images, skipped, _, worst = [round(v) for v in all_reduce_(local, "sum").tolist()]
        epoch, step = [int(v) for v in self.counts[3:5].tolist()]
        if skipped > self.reported and self.env.is_main:
            _logger.warning(f"skipped {skipped - self.reported} step(s) with a non-finite loss or overflowing "
                            f"gradients on some rank ({skipped} in all; the last at epoch {epoch}, step {step})")
        self.reported = skipped
        if self.max_bad_steps and worst >= self.max_bad_steps:
            raise NonFiniteLossError(
                f"{worst} training step{'s' if worst > 1 else ''} in a row had a non-finite loss (the last at "
                f"epoch {epoch}, step {step}; "
                f"--max-bad-steps {self.max_bad_steps})")
        return SyncResult(stop > 0, images, skipped, worst)


def scaler_scale(loss_scaler: Any) -> Optional[torch.Tensor]:
    """A copy of a GradScaler's current scale tensor (timm's NativeScaler or torch's), or None."""
    scaler = getattr(loss_scaler, "_scaler", loss_scaler)
    scale = getattr(scaler, "_scale", None)
    if isinstance(scale, torch.Tensor):
        return scale.detach().clone()
    init = getattr(scaler, "_init_scale", None)
    return None if init is None else torch.tensor(float(init))


def scaler_skipped(loss_scaler: Any, before: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
    """1.0 when the GradScaler lowered its scale in the step just done (it found an overflow
    and skipped the update), as a float32 scalar on ``device``."""
    after = scaler_scale(loss_scaler)
    if before is None or after is None:
        return torch.zeros((), device=device)
    return (after.to(device) < before.to(device)).float().reshape(())

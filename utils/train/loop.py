"""The training loop: one epoch of training on the summed per-exit loss, per-exit evaluation,
the meters that sum metrics over ranks, and the stop signal that ends a run resumably."""
from __future__ import annotations

import contextlib
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import dispatch_clip_grad
from torch.utils.data import DataLoader

from ..budget.stats import ExitStatsAccumulator, exit_batches
from ..budget.thresholds import budget_curve
from ..checkpoint.weights import unwrap_model
from ..data.images import check_bad_fraction
from ..precision import autocast_context
from ..run.distributed import DistEnv, all_gather_objects, all_reduce_
from ..run.progress import ProgressBar
from ..run.signals import StopSignal
from .guard import StepGuard, scaler_scale, scaler_skipped
from .rng import STREAM_STEP, derive_seed, seed_all

_logger = logging.getLogger("dvt.train")


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT stopped the run after a resumable checkpoint was written."""

    def __init__(self, signum: int, path: Optional[Path]) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum
        self.path = path


class ExitMeter:
    """Sums over samples of each exit's loss and top-1 hits, and the last exit's top-5 hits;
    :meth:`metrics` reduces them over all ranks."""

    def __init__(self, num_exits: int, device: torch.device) -> None:
        self.num_exits = num_exits
        self.sums = torch.zeros(2 + 2 * num_exits, dtype=torch.float64, device=device)  # n, loss_k, top1_k, top5

    def update(self, loss_sums: torch.Tensor, top1: torch.Tensor, n: int | torch.Tensor,
               top5: Optional[torch.Tensor] = None) -> None:
        """Args:
            loss_sums: (E,) summed loss of each exit over the batch.
            top1: (E,) correct predictions of each exit.
            n: samples in the batch (a device tensor is not read on the host).
            top5: last exit's top-5 hits, or None.
        """
        tail = top5.reshape(1) if top5 is not None else loss_sums.new_zeros(1)
        count = torch.as_tensor(n, dtype=loss_sums.dtype, device=loss_sums.device).reshape(1)
        self.sums += torch.cat([count, loss_sums.detach(), top1, tail]).double()

    def state_dict(self) -> dict:
        return {"sums": self.sums.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.sums.copy_(state["sums"])

    def metrics(self, with_top5: bool = False) -> dict[str, float]:
        """``loss`` (sum over exits of the mean loss), ``exit{k}_loss``, ``exit{k}_top1`` (%),
        ``top1`` (the last exit's) and, when asked, ``top5`` / ``exit{E}_top5``."""
        sums = all_reduce_(self.sums.clone()).tolist()
        E = self.num_exits
        n = max(sums[0], 1.0)
        out: dict[str, float] = {"loss": sum(sums[1:1 + E]) / n}
        for k in range(E):
            out[f"exit{k + 1}_loss"] = sums[1 + k] / n
        for k in range(E):
            out[f"exit{k + 1}_top1"] = 100.0 * sums[1 + E + k] / n
        out["top1"] = out[f"exit{E}_top1"]
        if with_top5:
            out["top5"] = out[f"exit{E}_top5"] = 100.0 * sums[-1] / n
        out["samples"] = sums[0]
        return out


def format_metrics(metrics: dict[str, float], num_exits: int) -> str:
    """``loss 6.1234 | exit1 2.0412 12.50% | exit2 ...``"""
    parts = [f"loss {metrics['loss']:.4f}"]
    for k in range(1, num_exits + 1):
        parts.append(f"exit{k} {metrics[f'exit{k}_loss']:.4f} {metrics[f'exit{k}_top1']:.2f}%")
    if "top5" in metrics:
        parts.append(f"top5 {metrics['top5']:.2f}%")
    return " | ".join(parts)


@dataclass
class TrainContext:
    """What a training step needs besides the model and the data."""
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    env: DistEnv
    seed: int
    amp_dtype: Optional[torch.dtype] = None
    loss_scaler: Any = None
    clip_grad: Optional[float] = None
    clip_mode: str = "norm"
    model_ema: Any = None
    ema_warmup: bool = False
    mixup_fn: Optional[Callable] = None
    lr_scheduler: Any = None
    log_interval: int = 50
    progress: bool = False
    stop: Optional[StopSignal] = None
    recovery_interval: int = 0
    save_recovery: Optional[Callable[[int, int, "ExitMeter"], None]] = None
    guard: Optional[StepGuard] = None  # skips non-finite steps; made from env when None
    bad_image_fraction: float = 0.0  # unreadable training images accepted per epoch (skip policy)
    normalize: Optional[Callable] = None  # uint8 batches to normalised float on the device
    accum_steps: int = 1  # batches whose gradients one optimizer update sums (--grad-accum-steps)


@dataclass
class EpochResult:
    """metrics: reduced over ranks; steps_done: steps of the epoch done (all of them unless
    interrupted); meter: this rank's sums (a resumable checkpoint keeps them); skipped_steps:
    non-finite steps skipped this epoch; bad_images: unreadable images skipped, all ranks."""
    metrics: dict[str, float]
    num_updates: int
    steps_done: int
    interrupted: bool
    images_per_second: float
    meter: ExitMeter
    skipped_steps: int = 0
    bad_images: int = 0


def _lr(optimizer: torch.optim.Optimizer) -> float:
    return max(g["lr"] for g in optimizer.param_groups)


def _forward(model: nn.Module, ctx: TrainContext, images: torch.Tensor, targets: torch.Tensor,
             ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
    """Mixup, the forward pass under autocast and the per-exit losses: (per-exit logits,
    losses (E,), the hard labels top-1 is counted against)."""
    images = images.to(ctx.env.device, non_blocking=True)
    targets = targets.to(ctx.env.device, non_blocking=True)
    if ctx.normalize is not None and images.dtype == torch.uint8:
        images = ctx.normalize(images)
    hard = targets
    if ctx.mixup_fn is not None:
        images, targets = ctx.mixup_fn(images, targets)
        hard = targets.argmax(dim=-1)  # the dominant label of the mixed target
    with autocast_context(ctx.env.device, ctx.amp_dtype):
        outputs = model(images)
    losses = torch.stack([ctx.loss_fn(out.float(), targets) for out in outputs])  # (E,)
    return outputs, losses, hard


def _update(model: nn.Module, plain: nn.Module, ctx: TrainContext, loss: torch.Tensor, num_updates: int,
            guard: StepGuard, group: "_Group") -> tuple[int, torch.Tensor]:
    """Add ``loss``'s gradients (scaled by ``group``'s share) to those of the update under way
    and, at the last batch of its group, make the update (scaled, clipped), skipped on every rank
    when a loss of the group is not finite on one of them (or the fp16 gradients overflow), then
    the EMA and the per-update learning rate. Returns (the updates done, 1.0 as a device scalar
    when the batch does not count: its loss is not finite, or its update was skipped)."""
    if group.first:
        ctx.optimizer.zero_grad(set_to_none=True)
    loss = loss / group.size if group.size > 1 else loss
    if ctx.loss_scaler is not None:
        before = scaler_scale(ctx.loss_scaler) if group.last else None
        ctx.loss_scaler(loss, ctx.optimizer, clip_grad=ctx.clip_grad, clip_mode=ctx.clip_mode,
                        parameters=model.parameters(), need_update=group.last)
        bad = scaler_skipped(ctx.loss_scaler, before, ctx.env.device) if group.last else _not_finite(loss)
    else:
        bad = guard.loss_flag(loss)
        group.bad = bad if group.first else torch.maximum(group.bad, bad)
        loss.backward()
        if group.last:
            if ctx.clip_grad is not None:
                dispatch_clip_grad(model.parameters(), ctx.clip_grad, mode=ctx.clip_mode)
            guard.optimizer_step(ctx.optimizer, group.bad)
            bad = group.bad
    if not group.last:
        return num_updates, bad
    num_updates += 1  # a skipped step still advances the schedule, so positions stay comparable
    if ctx.model_ema is not None:
        ctx.model_ema.update(plain, step=num_updates if ctx.ema_warmup else None)
    if ctx.lr_scheduler is not None:
        ctx.lr_scheduler.step_update(num_updates=num_updates)
    return num_updates, bad


def _not_finite(loss: torch.Tensor) -> torch.Tensor:
    return (~torch.isfinite(loss.detach())).float().reshape(())


class _Group:
    """The steps (batches) one optimizer update sums: its first step, its size (the last group of
    an epoch, and the first after a resume at another grouping, may be short); at one of its
    steps (:meth:`at`), whether that step is its first and its last; without a scaler, whether a
    loss of the group so far was not finite."""

    def __init__(self, start: int, size: int) -> None:
        self.start, self.size = start, size
        self.first = self.last = False
        self.bad: Optional[torch.Tensor] = None

    def at(self, step: int) -> "_Group":
        self.first, self.last = step == self.start, step + 1 == self.start + self.size
        return self


def _step_groups(accum_steps: int, start_step: int, total_steps: int) -> dict[int, _Group]:
    """Each step of the epoch from ``start_step`` on -> the group of its update (one object per update)."""
    groups = {}
    for first, size in update_groups(accum_steps, start_step, total_steps):
        groups.update(dict.fromkeys(range(first, first + size), _Group(first, size)))
    return groups


def update_groups(accum_steps: int, start_step: int, total_steps: int) -> list[tuple[int, int]]:
    """(first step, size) of each optimizer update of an epoch of ``total_steps`` batches from
    ``start_step`` on: groups of ``accum_steps`` batches counted from the epoch's start, the last
    one shorter when they do not divide the epoch, the first one shorter when the epoch resumes
    inside a group."""
    groups, step = [], start_step
    while step < total_steps:
        end = min((step // accum_steps + 1) * accum_steps, total_steps)
        groups.append((step, end - step))
        step = end
    return groups


def updates_per_epoch(steps: int, accum_steps: int) -> int:
    """Optimizer updates in an epoch of ``steps`` batches (:func:`update_groups`; at least one,
    for the schedule)."""
    return max(1, len(update_groups(accum_steps, 0, steps)))


def _log_step(ctx: TrainContext, meter: "ExitMeter", bar: Any, where: str, rate: float) -> None:
    """The running metrics (reduced over ranks: every rank calls this), on rank 0's log or bar."""
    m = meter.metrics()
    if not ctx.env.is_main:
        return
    if ctx.progress:
        bar.set_postfix_str(f"loss {m['loss']:.3f} {rate:.1f} img/s")
    else:
        _logger.info(f"{where} {format_metrics(m, meter.num_exits)} | lr {_lr(ctx.optimizer):.3e} | {rate:.1f} img/s")


def train_one_epoch(
        model: nn.Module,
        loader: DataLoader,
        ctx: TrainContext,
        epoch: int,
        num_updates: int,
        start_step: int = 0,
        meter: Optional[ExitMeter] = None,
) -> EpochResult:
    """Train one epoch (from ``start_step``); the loss is the sum of the per-exit losses, and an
    optimizer update sums the gradients of ``ctx.accum_steps`` steps (batches).

    Each step's RNGs are seeded from (seed, rank, epoch, step). An update with a non-finite loss
    on some rank is skipped on every rank and counted (``ctx.guard`` stops the run after too many
    in a row). Nothing is read on the host per step: the stop request (a signal on any rank), the
    skip counters and the unreadable-image count are read together after the update that reaches
    a multiple of ``log_interval`` steps (and before a recovery checkpoint, and at the end), where
    a stop request ends the epoch on every rank.

    Args:
        model: the (possibly DDP-wrapped) cascade returning a tuple of per-exit logits.
        loader: this epoch's (images, targets) batches from ``start_step`` on (a ``BadImageCounter`` when skipping).
        ctx: optimizer, loss, precision, EMA, mixup, scheduler and logging settings.
        epoch: epoch index.
        num_updates: optimizer updates done before this call.
        start_step: steps of this epoch already done (resumed runs).
        meter: partial metrics of the steps already done (resumed runs).
    """
    env = ctx.env
    plain = unwrap_model(model)
    guard = ctx.guard = ctx.guard or StepGuard(env)
    skipped_before = guard.reported
    meter = meter or ExitMeter(plain.num_exits, env.device)
    total_steps = start_step + len(loader)
    getattr(loader, "reset", lambda: None)()  # a BadImageCounter's count
    model.train()
    step, interrupted, samples, bad_images = start_step, False, 0, 0
    started = time.perf_counter()
    bar = ProgressBar(total=total_steps, initial=start_step, desc=f"train {epoch}", disable=not ctx.progress,
                      leave=False, dynamic_ncols=True)
    groups = _step_groups(ctx.accum_steps, start_step, total_steps)
    for step, (images, targets) in enumerate(loader, start=start_step):
        group = groups[step].at(step)
        num_updates, batch = _train_step(model, plain, ctx, meter, images, targets, epoch, step, num_updates, group)
        samples += batch * env.world_size
        bar.update(1)
        if not group.last:  # the stop request and the checkpoints wait for the update
            continue
        stop, bad_images = _sync_point(ctx, loader, meter, bar, epoch, group.start, step + 1, total_steps, num_updates,
                                       samples / max(time.perf_counter() - started, 1e-9), bad_images)
        if stop:
            interrupted, step = True, step + 1
            break
    else:
        step = total_steps
    bar.close()
    rate = samples / (time.perf_counter() - started) if samples else 0.0
    metrics = {**meter.metrics(), "lr": _lr(ctx.optimizer), "img_per_s": rate}
    return EpochResult(metrics, num_updates, step, interrupted, rate, meter, guard.reported - skipped_before,
                       bad_images)


def _train_step(model: nn.Module, plain: nn.Module, ctx: TrainContext, meter: ExitMeter, images: torch.Tensor,
                targets: torch.Tensor, epoch: int, step: int, num_updates: int, group: _Group) -> tuple[int, int]:
    """One step with the global RNGs seeded from (seed, rank, epoch, step): the forward pass,
    the gradients and, at the last batch of ``group``, the update (skipped on every rank when a
    loss of the group is not finite on one of them), and the step's metrics; returns (the
    updates done, the batch size)."""
    guard = ctx.guard
    seed_all(derive_seed(ctx.seed, STREAM_STEP, ctx.env.rank, epoch, step))
    # DDP all-reduces the gradients of the group's last batch only (no_sync must hold the forward pass too)
    local = model.no_sync() if not group.last and hasattr(model, "no_sync") else contextlib.nullcontext()
    with local:
        outputs, losses, hard = _forward(model, ctx, images, targets)
        losses = guard.poison(losses, epoch, step)
        num_updates, bad = _update(model, plain, ctx, losses.sum(), num_updates, guard, group)
    if group.last:
        guard.record(bad, epoch, step)
    _count(meter, outputs, losses, hard, bad)
    return num_updates, hard.shape[0]


def _sync_point(ctx: TrainContext, loader: Any, meter: ExitMeter, bar: Any, epoch: int, since: int, done: int,
                total: int, num_updates: int, rate: float, bad_images: int) -> tuple[bool, int]:
    """After an update, made from steps ``since`` to ``done`` of the epoch's ``total``. At a sync
    point (once those steps pass a multiple of ``log_interval``, or of 50 without logging; at the
    end; before a recovery checkpoint, once they pass a multiple of ``recovery_interval``): the
    batched host read of the stop request, the skip counters and the unreadable images, the
    unreadable-image limit, the log line and, unless stopping, the recovery checkpoint. Returns
    (stop on every rank, unreadable images so far: ``bad_images`` between sync points)."""
    last = done == total
    log = last or done // (ctx.log_interval or 50) > since // (ctx.log_interval or 50)
    recover = bool(ctx.recovery_interval and ctx.save_recovery is not None and not last
                   and done // ctx.recovery_interval > since // ctx.recovery_interval)
    if not (log or recover):
        return False, bad_images
    sync = ctx.guard.sync(ctx.stop is not None and ctx.stop.requested, getattr(loader, "count", 0))
    if sync.bad_images:
        check_bad_fraction(sync.bad_images, len(loader.dataset), ctx.bad_image_fraction)
    if ctx.log_interval and (log or sync.stop):
        _log_step(ctx, meter, bar, f"train {epoch} [{done:>5d}/{total}]", rate)
    if recover and not sync.stop:
        ctx.save_recovery(done, num_updates, meter)
    return sync.stop, sync.bad_images


def _count(meter: ExitMeter, outputs: tuple[torch.Tensor, ...], losses: torch.Tensor, hard: torch.Tensor,
           bad: torch.Tensor) -> None:
    """Add a step to the epoch's metrics on the device; a skipped step adds nothing."""
    batch = hard.shape[0]
    ok = 1.0 - bad
    with torch.no_grad():
        top1 = torch.stack([(out.argmax(dim=-1) == hard).sum() for out in outputs])
        loss_sums = torch.where(bad > 0, torch.zeros_like(losses), losses.detach() * batch)
    meter.update(loss_sums, top1 * ok, batch * ok)


@torch.no_grad()
def evaluate(
        model: nn.Module,
        loader: DataLoader,
        env: DistEnv,
        amp_dtype: Optional[torch.dtype] = None,
        progress: bool = False,
        desc: str = "val",
        stats: Optional[ExitStatsAccumulator] = None,
) -> dict[str, float]:
    """Per-exit cross-entropy and top-1 (and the last exit's top-5) over this rank's shard of
    ``loader``, summed over all ranks.

    Args:
        model: the plain cascade (not DDP-wrapped: ranks may hold different numbers of batches).
        loader: (images, targets) batches of a :class:`ShardSampler` shard.
        env: this process's device and rank.
        amp_dtype: autocast dtype, or None.
        progress: show a progress bar.
        desc: its label.
        stats: also collect this rank's per-sample exit statistics here (see
            :func:`dynamic_accuracy`).
    """
    meter = ExitMeter(unwrap_model(model).num_exits, env.device)
    started = time.perf_counter()
    for batch in exit_batches(model, loader, env.device, amp_dtype, desc, progress):
        targets = batch.targets
        outputs = [out.float() for out in batch.logits]
        losses = torch.stack([F.cross_entropy(out, targets, reduction="sum") for out in outputs])
        top1 = torch.stack([(out.argmax(dim=-1) == targets).sum() for out in outputs])
        k = min(5, outputs[-1].shape[-1])
        top5 = (outputs[-1].topk(k, dim=-1).indices == targets[:, None]).any(dim=-1).sum()
        meter.update(losses, top1, batch.images.shape[0], top5)
        if stats is not None:
            stats.update(outputs, targets)
    metrics = meter.metrics(with_top5=True)
    metrics["img_per_s"] = metrics["samples"] / max(time.perf_counter() - started, 1e-9)
    return metrics


MONITORED_BUDGETS = (5, 10, 20, 40)


def dynamic_accuracy(stats: ExitStatsAccumulator, flops: list[float],
                     budgets: Sequence[int] = MONITORED_BUDGETS) -> dict[str, float]:
    """Top-1 and expected GFLOPs of budgeted batch classification at a few budget rows ``p``,
    with the thresholds fitted on the same validation set: a quick view of the dynamic trade-off
    while training (the released file fits them on training images). Every rank must call this
    with its shard's statistics; the result is the same on all.

    Returns:
        ``dynamic_top1_p{p}`` and ``dynamic_gflops_p{p}`` for each budget row.
    """
    parts = all_gather_objects(stats.result())
    confidence = torch.cat([conf for conf, _ in parts], dim=1)  # (E, N) over all ranks
    correct = torch.cat([hits for _, hits in parts], dim=1)
    _, (gflops, top1) = budget_curve(confidence, correct, flops, calib_conf=confidence, budgets=budgets)
    out = {f"dynamic_top1_p{p}": t for p, t in zip(budgets, top1)}
    out.update({f"dynamic_gflops_p{p}": g for p, g in zip(budgets, gflops)})
    return out


"""Training checkpoints: the whole training state written by every rank's share (a run's
``last.pth.tar`` and ``best.pth.tar``: :class:`Checkpoints`), restored exactly, and the checks
that a checkpoint fits the run about to resume from it."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from ..errors import CheckpointError
from ..run.distributed import DistEnv, all_gather_objects, barrier
from ..run.folder import BEST, LAST
from ..train.loop import ExitMeter, TrainContext
from ..train.rng import capture_rng_state, restore_rng_state
from .files import atomic_copy, atomic_save
from .weights import CHECKPOINT_FORMAT, checkpoint_weights, is_training_checkpoint, load_weights, unwrap_model

_logger = logging.getLogger("dvt.train")


def training_checkpoint(
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        epoch: int,
        step: int,
        num_updates: int,
        config: dict,
        per_rank: list[dict],
        model_ema: Any = None,
        loss_scaler: Any = None,
        lr_scheduler: Any = None,
        best_metric: Optional[float] = None,
        best_epoch: Optional[int] = None,
        metrics: Optional[dict] = None,
) -> dict:
    """The whole training state, loadable with ``weights_only=True``.

    ``epoch`` is the epoch to continue and ``step`` the steps of it already done (0 at an
    epoch boundary). ``per_rank`` holds every rank's RNG states and partial epoch metrics.
    ``model``/``model_ema`` are plain state dicts (no DDP prefix); ``model_name`` and
    ``model_kwargs`` rebuild the model from the file alone.
    """
    plain = unwrap_model(model)
    return {
        "format": CHECKPOINT_FORMAT,
        "model_name": getattr(plain, "model_name", None),
        "model_kwargs": dict(getattr(plain, "model_kwargs", {})),
        "model": plain.state_dict(),
        "model_ema": None if model_ema is None else model_ema.module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": None if loss_scaler is None else loss_scaler.state_dict(),
        "scheduler": None if lr_scheduler is None else lr_scheduler.state_dict(),
        "epoch": epoch,
        "step": step,
        "num_updates": num_updates,
        "best_metric": best_metric,
        "best_epoch": best_epoch,
        "metrics": dict(metrics or {}),
        "config": dict(config),
        "world_size": len(per_rank),
        "per_rank": per_rank,
    }


def rank_state(meter: Any = None) -> dict:
    """This rank's part of a checkpoint: RNG states and partial epoch metrics."""
    return {"rng": capture_rng_state(), "meter": None if meter is None else meter.state_dict()}


def save_training_state(path: Path, build: Callable[[list[dict]], dict], env: DistEnv,
                        meter: Any = None, also: Sequence[Path] = ()) -> None:
    """Collect every rank's state, then rank 0 writes the checkpoint atomically to ``path``
    (and copies it to each path of ``also``: :func:`atomic_copy`). Every rank must call this;
    all return after the write."""
    per_rank = all_gather_objects(rank_state(meter))
    if env.is_main:
        checkpoint = build(per_rank)
        atomic_save(checkpoint, path)
        for extra in also:
            atomic_copy(path, extra)
    barrier()


@dataclass
class ResumePoint:
    """Where a run continues: the epoch, the steps of it already done, the optimizer updates,
    the best score so far and this rank's partial epoch metrics (None at an epoch boundary)."""
    epoch: int = 0
    step: int = 0
    num_updates: int = 0
    best_metric: Optional[float] = None
    best_epoch: Optional[int] = None
    meter_state: Optional[dict] = None


def restore_training_state(checkpoint: Mapping[str, Any], env: DistEnv, model: nn.Module,
                           optimizer: Optional[torch.optim.Optimizer] = None, model_ema: Any = None,
                           loss_scaler: Any = None, lr_scheduler: Any = None) -> ResumePoint:
    """Load a training checkpoint of this project into the run's parts (the optimizer, scaler
    and scheduler only when ``optimizer`` is given) and restore this rank's RNG states.

    Args:
        checkpoint: a checkpoint for which :func:`is_training_checkpoint` holds.
        env: this process's rank and world size.
        model: the plain model.
        optimizer: the optimizer, or None to restore the weights and the position only.
        model_ema: timm's EMA wrapper, or None.
        loss_scaler: the gradient scaler, or None.
        lr_scheduler: the learning-rate scheduler, or None.
    """
    load_weights(model, checkpoint["model"])
    if model_ema is not None:
        ema_weights, _ = checkpoint_weights(dict(checkpoint), "ema" if checkpoint.get("model_ema") else "model")
        model_ema.module.load_state_dict(ema_weights)
    if optimizer is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        if loss_scaler is not None and checkpoint.get("scaler") is not None:
            loss_scaler.load_state_dict(checkpoint["scaler"])
        if lr_scheduler is not None and checkpoint.get("scheduler") is not None:
            lr_scheduler.load_state_dict(checkpoint["scheduler"])
    point = ResumePoint(int(checkpoint["epoch"]), int(checkpoint["step"]), int(checkpoint["num_updates"]),
                        checkpoint.get("best_metric"), checkpoint.get("best_epoch"))
    per_rank = checkpoint.get("per_rank") or []
    if len(per_rank) == env.world_size:
        restore_rng_state(per_rank[env.rank]["rng"])
        point.meter_state = per_rank[env.rank].get("meter")
    else:
        _logger.warning(f"the checkpoint was written by {len(per_rank)} processes, this run has "
                        f"{env.world_size}: the run continues, but not exactly as it would have")
    return point


class Checkpoints:
    """The run's training checkpoints (``last.pth.tar``, ``best.pth.tar``), built from its parts.

    It holds the parts themselves, not the loaders or the training context, so that the
    context's recovery callback makes no reference cycle that would keep loader workers alive.
    """

    def __init__(self, folder: Path, env: DistEnv, config: dict, model: nn.Module, ctx: TrainContext,
                 point: ResumePoint, class_names: Optional[list[str]] = None) -> None:
        self.folder, self.env, self.config, self.model, self.point = folder, env, config, model, point
        self.parts = (ctx.optimizer, ctx.model_ema, ctx.loss_scaler, ctx.lr_scheduler)
        self.class_names = class_names

    def save(self, epoch: int, step: int, updates: int, meter: Optional[ExitMeter] = None,
             metrics: Optional[dict] = None, best: bool = False) -> None:
        """Every rank calls this; rank 0 writes ``last.pth.tar`` (and ``best.pth.tar``)."""
        optimizer, model_ema, loss_scaler, lr_scheduler = self.parts
        point = self.point

        def build(per_rank: list[dict]) -> dict:
            checkpoint = training_checkpoint(self.model, optimizer, epoch, step, updates, self.config, per_rank,
                                             model_ema, loss_scaler, lr_scheduler, point.best_metric, point.best_epoch,
                                             metrics)
            if self.class_names is not None:
                checkpoint["class_names"] = list(self.class_names)
            return checkpoint

        save_training_state(self.folder / LAST, build, self.env, meter, also=[self.folder / BEST] if best else [])

    def save_recovery(self, step: int, updates: int, meter: ExitMeter) -> None:
        """Within the epoch under way (``point.epoch``)."""
        self.save(self.point.epoch, step, updates, meter)


def require_training_checkpoint(checkpoint: Mapping[str, Any], path: str) -> None:
    """Raise a CheckpointError unless ``checkpoint`` (``--resume path``) is a training checkpoint
    of main.py."""
    if not is_training_checkpoint(checkpoint):
        raise CheckpointError(f"--resume {path}: not a training checkpoint of main.py (last.pth.tar or "
                          "best.pth.tar); to start from weights only use --initial-checkpoint or --finetune")


def state_layout(state_dict: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a state dict (tensors only)."""
    return {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}


def check_resumable(checkpoint: Mapping[str, Any], path: str, model: str, img_size: int,
                    class_names: Optional[Sequence[str]], num_classes: Optional[int],
                    layout: Optional[Mapping[str, tuple[int, ...]]] = None) -> None:
    """A training checkpoint fits the run about to resume from it.

    Args:
        checkpoint: the loaded file.
        path: its path, for the messages.
        model: ``--model`` of the run.
        img_size: ``--img-size`` of the run.
        class_names: the dataset's classes (None when unknown, e.g. before CIFAR is read).
        num_classes: the run's number of classes (None when unknown).
        layout: key -> shape of --model's weights; a checkpoint stored under another model
            name is accepted when its weights have exactly this layout (a renamed variant).

    Raises:
        CheckpointError: a released file, or another model, image size or set of classes.
    """
    if "model_state_dict" in checkpoint and "format" not in checkpoint:
        raise CheckpointError(f"--resume {path} is a released checkpoint (weights and results only, no training "
                          "state); continue training from its weights with --initial-checkpoint or --finetune")
    stored = checkpoint.get("model_name")
    weights = checkpoint.get("model")
    same_layout = layout is not None and isinstance(weights, Mapping) and state_layout(weights) == dict(layout)
    if stored and stored != model and not same_layout:
        raise CheckpointError(f"--resume {path} is a {stored} checkpoint, but --model is {model}; "
                              f"pass --model {stored}")
    kwargs = checkpoint.get("model_kwargs") or {}
    if kwargs.get("img_size") not in (None, img_size):
        raise CheckpointError(f"--resume {path} was trained at --img-size {kwargs['img_size']}, this run is at "
                          f"{img_size}; pass --img-size {kwargs['img_size']}")
    stored_names = checkpoint.get("class_names")
    if class_names is not None and stored_names is not None and list(stored_names) != list(class_names):
        from ..data.classes import compare_classes

        diff = compare_classes(stored_names, class_names, "the checkpoint", "the dataset")
        raise CheckpointError(f"--resume {path}: the dataset's classes are not those of the checkpoint ({diff}); "
                          "resume on the dataset it was trained on")
    stored_count = kwargs.get("num_classes")
    if num_classes is not None and stored_count is not None and stored_count != num_classes:
        raise CheckpointError(f"--resume {path} has {stored_count} classes, this run {num_classes}; resume on the "
                          "dataset it was trained on (or start a new run with --finetune)")


def check_not_rewinding(resume: str | os.PathLike, folder: str | os.PathLike, resumed: Mapping[str, Any],
                        last_name: str = "last.pth.tar") -> None:
    """Resuming from an older checkpoint (say best.pth.tar) into a folder whose last
    checkpoint is further on would overwrite that one with an earlier state: refuse.

    Raises:
        CheckpointError: the folder's last checkpoint is ahead of ``resume``.
    """
    last = Path(folder) / last_name
    if not last.is_file() or last.resolve() == Path(resume).resolve():
        return
    from .files import load_checkpoint_file

    try:
        ahead = load_checkpoint_file(last)
    except CheckpointError:
        return  # a damaged last checkpoint is no state worth keeping
    here, there = int(resumed.get("num_updates", 0)), int(ahead.get("num_updates", 0))
    if there > here:
        raise CheckpointError(
            f"--resume {resume} (epoch {resumed.get('epoch')}, {here} updates) is behind {last} (epoch "
            f"{ahead.get('epoch')}, {there} updates) of the same run, which resuming would overwrite; resume "
            f"from {last}, or pass --experiment NAME to continue from {Path(resume).name} in a new folder")

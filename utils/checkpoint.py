"""Checkpoints: every read and write of one, and the model rebuilt from any of them.

Four layouts are read: the released ``.pth.tar`` files (``model_state_dict`` and results,
original key names), this project's training checkpoints (``format`` ``dvt-train-1``: model,
EMA, optimizer, position and RNG states), the training checkpoints of the original code
(timm's checkpoint saver: ``state_dict``, ``state_dict_ema``, ``optimizer``, ``epoch``,
``arch``, ``args``, ...) and plain state dicts. Loading never unpickles arbitrary objects:
``torch.load(weights_only=True)`` with only numpy scalars, arrays and dtypes and
``argparse.Namespace`` allowed beyond tensors and plain containers (the released files may
hold numpy numbers in their result lists; the original training checkpoints keep their
options as a Namespace). Writing is atomic.
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from models.pretrained import STATE_DICT_KEYS, numpy_safe_globals

from .atomic import atomic_copy, default_file_mode, os_error_in
from .distributed import DistEnv, all_gather_objects, barrier
from .errors import CheckpointError, CheckpointWriteError
from .preflight import unreadable_checkpoint_reason
from .rng import capture_rng_state, restore_rng_state

_logger = logging.getLogger("dvt.train")

CHECKPOINT_FORMAT = "dvt-train-1"
# Keys that timm's checkpoint saver (which the original training script uses) writes next to
# its ``state_dict``; ``state_dict_ema`` only when the run kept a model EMA.
ORIGINAL_TRAINING_KEYS = ("state_dict_ema", "optimizer", "epoch", "arch", "args", "version")


def _safe_globals() -> list:
    """numpy values, and the options Namespace of the original training checkpoints (a
    Namespace only takes attributes: loading one runs no code)."""
    return numpy_safe_globals() + [argparse.Namespace]


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Read a checkpoint with ``weights_only=True``.

    Raises:
        CheckpointError: the file is missing, not a checkpoint, or holds pickled objects
            other than tensors, numbers, strings, containers and numpy values.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file; pass a file in it (e.g. {path / 'last.pth.tar'})")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    reason = unreadable_checkpoint_reason(path)
    if reason:
        raise CheckpointError(f"cannot read checkpoint {path}: {reason}; pass another checkpoint (a run folder "
                              "keeps last.pth.tar and best.pth.tar)")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        unsafe = [line.strip() for line in first if "GLOBAL" in line or "Unsupported" in line]
        raise CheckpointError(
            f"refusing to load {path}: it is not a safe checkpoint (it holds pickled Python objects "
            f"that could run code when loaded). {' '.join(unsafe)[:300]}".rstrip()) from None
    except Exception as e:  # torch.load reports a damaged file through many exception types
        detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path} (not a PyTorch checkpoint, or damaged): {detail}") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dictionary")
    return dict(obj)


def extract_state_dict(checkpoint: Mapping[str, Any], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The model weights in a checkpoint: under ``model_state_dict``, ``state_dict`` or
    ``model``, or the checkpoint itself when it is a plain state dict."""
    for key in STATE_DICT_KEYS:
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            state_dict = checkpoint[key]
            break
    else:
        if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            state_dict = checkpoint
        else:
            raise CheckpointError(
                f"{source} has no model weights: expected one of the keys {', '.join(STATE_DICT_KEYS)}; "
                f"found {', '.join(map(str, list(checkpoint)[:10]))}")
    return dict(state_dict)


def _describe(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise a :class:`CheckpointError` naming the missing, unexpected and mis-shaped keys
    when ``state_dict`` (any layout ``model.load_state_dict`` accepts) does not fit ``model``."""
    from models.dvt import checkpoint_filter_fn

    given = checkpoint_filter_fn(dict(state_dict)) if hasattr(model, "stages") else dict(state_dict)
    expected = model.state_dict()
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    misshaped = [f"{k} (checkpoint {tuple(given[k].shape)}, model {tuple(v.shape)})"
                 for k, v in expected.items() if k in given and tuple(given[k].shape) != tuple(v.shape)]
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing keys [{len(missing)}]: {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected keys [{len(unexpected)}]: {_describe(unexpected)}")
        if misshaped:
            parts.append(f"mis-shaped keys [{len(misshaped)}]: {_describe(misshaped, 4)}")
        name = getattr(model, "model_name", type(model).__name__)
        hint = guess_model(given)
        hint = f" It looks like a checkpoint for {hint}." if hint and hint != name else ""
        raise CheckpointError(f"checkpoint does not fit {name}: " + "; ".join(parts) + "." + hint)


def guess_model(state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The registered cascade (and reuse setting) whose layout matches ``state_dict``,
    heads excepted, or None."""
    from models.dvt import checkpoint_filter_fn

    given = {k: tuple(v.shape) for k, v in checkpoint_filter_fn(dict(state_dict)).items() if ".head." not in k}
    for name, feature_reuse, relation_reuse, shapes in _registered_layouts():
        if shapes == given:
            if feature_reuse and relation_reuse:
                return name
            return f"{name} (feature_reuse={feature_reuse}, relation_reuse={relation_reuse})"
    return None


@functools.lru_cache(maxsize=1)
def _registered_layouts() -> list[tuple[str, bool, bool, dict[str, tuple[int, ...]]]]:
    """Key -> shape maps (heads excepted) of every registered cascade and reuse setting."""
    from models.registry import MODEL_CFGS, build_dvt

    layouts = []
    for name in MODEL_CFGS:
        for fr, rr in ((True, True), (False, True), (True, False), (False, False)):
            with torch.device("meta"):  # shapes only, no memory and no initialisation cost
                model = build_dvt(name, feature_reuse=fr, relation_reuse=rr)
            shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if ".head." not in k}
            layouts.append((name, fr, rr, shapes))
    return layouts


def load_weights(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """Strictly load weights in any accepted layout, with a clear error on mismatch."""
    check_state_dict(model, state_dict)
    model.load_state_dict(state_dict, strict=True)
    return model


def load_checkpoint(model: torch.nn.Module, path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load the weights of a checkpoint file into ``model`` (strict) and return the whole
    checkpoint dictionary (results, thresholds, ...)."""
    checkpoint = load_checkpoint_file(path, map_location)
    load_weights(model, extract_state_dict(checkpoint, str(path)))
    return checkpoint


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: a reader (or a
    crash) never sees a half-written checkpoint."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise CheckpointWriteError(path, e) from None
    try:
        os.fchmod(fd, default_file_mode())  # mkstemp makes 0600 files; a checkpoint is shared like any other
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        cause = os_error_in(e)
        if cause is not None:  # torch.save reports a failed write as a RuntimeError ("unexpected pos")
            raise CheckpointWriteError(path, cause) from None
        raise


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def head_classes(state_dict: dict[str, torch.Tensor]) -> Optional[int]:
    """Output size of the classifier heads of a state dict (any key layout)."""
    for key, value in state_dict.items():
        if key.endswith("head.weight") and value.dim() == 2:
            return int(value.shape[0])
    return None


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


def is_training_checkpoint(checkpoint: dict) -> bool:
    return checkpoint.get("format") == CHECKPOINT_FORMAT


def is_original_training_checkpoint(checkpoint: Mapping[str, Any]) -> bool:
    """Written by the original code's training script (timm's checkpoint saver)."""
    return isinstance(checkpoint.get("state_dict"), Mapping) and any(k in checkpoint for k in ORIGINAL_TRAINING_KEYS)


def checkpoint_weights(checkpoint: dict, which: str = "auto", source: str = "checkpoint") -> tuple[dict, str]:
    """The weights to use from a checkpoint: ``"model"``, ``"ema"`` or ``"auto"`` (the EMA
    weights when a training checkpoint, this project's or the original code's, has them, else
    the model's; the original evaluated, fine-tuned and released its EMA weights). Released
    files and plain state dicts have one set of weights."""
    if is_training_checkpoint(checkpoint):
        model_key, ema_key = "model", "model_ema"
    elif is_original_training_checkpoint(checkpoint):
        model_key, ema_key = "state_dict", "state_dict_ema"
    else:
        if which == "ema":
            raise CheckpointError(f"{source} is not a training checkpoint (of this project or of the original "
                                  "code); it has no EMA weights")
        return extract_state_dict(checkpoint, source), "model"
    if which == "ema" or (which == "auto" and checkpoint.get(ema_key) is not None):
        if checkpoint.get(ema_key) is None:
            raise CheckpointError(f"{source} has no EMA weights ('{ema_key}'): the run kept no model EMA")
        return dict(checkpoint[ema_key]), "ema"
    return dict(checkpoint[model_key]), "model"


def _original_options(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The model name and input size an original training checkpoint records (``arch`` is the
    ``--model`` it was trained with), as far as they are known."""
    if not is_original_training_checkpoint(checkpoint):
        return {}
    options = vars(checkpoint["args"]) if isinstance(checkpoint.get("args"), argparse.Namespace) else {}
    known = {"model_name": checkpoint.get("arch") or options.get("model")}
    if isinstance(options.get("img_size"), int):
        known["img_size"] = options["img_size"]
    return {k: v for k, v in known.items() if isinstance(v, (str, int))}


def checkpoint_model_name(checkpoint: Mapping[str, Any], source: str = "checkpoint", name: Optional[str] = None,
                          default_name: Optional[str] = None) -> str:
    """The registered model a checkpoint is for: its own ``model_name`` (or the ``arch`` of an
    original training checkpoint), which ``name`` (the user's --model) must agree with, else
    ``name``, else ``default_name``."""
    from models.baseline import is_cascade_name
    from models.registry import MODEL_CFGS

    stored = checkpoint.get("model_name")
    if stored is None and _original_options(checkpoint).get("model_name") in MODEL_CFGS:
        stored = _original_options(checkpoint)["model_name"]  # not a class name, as timm saves without options
    if stored is not None and name is not None and stored != name:
        raise CheckpointError(f"{source} holds a {stored} checkpoint, but --model is {name}; "
                              f"drop --model or pass --model {stored}")
    model_name = stored or name or default_name
    if model_name is None:
        raise CheckpointError(f"{source} does not name its model; pass --model NAME (one of {', '.join(MODEL_CFGS)})")
    if not is_cascade_name(model_name):
        raise CheckpointError(f"{source} names an unknown model {model_name!r}; known: {', '.join(MODEL_CFGS)} "
                              "and timm's models (single-exit baselines)")
    return model_name


def build_from_checkpoint(
        checkpoint: Mapping[str, Any],
        source: str = "checkpoint",
        name: Optional[str] = None,
        default_name: Optional[str] = None,
        weights: str = "auto",
        defaults: Optional[Mapping[str, Any]] = None,
        **overrides: Any,
) -> tuple[nn.Module, str]:
    """The model of any checkpoint (ours, training, released or original layout) with its
    weights loaded, in eval mode on the CPU; and which weights were used (``"model"`` or
    ``"ema"``).

    Args:
        checkpoint: the loaded checkpoint dictionary.
        source: its file name, for messages.
        name: a model name the checkpoint's own (``model_name``) must agree with.
        default_name: the model to build when the checkpoint names none (released files).
        weights: ``"auto"``, ``"model"`` or ``"ema"`` (see :func:`checkpoint_weights`).
        defaults: constructor arguments for checkpoints that do not store theirs (released
            files); ``num_classes`` defaults to the size of the heads, ``img_size`` to 224.
        overrides: constructor arguments that replace the stored ones (e.g. ``img_size``).
    """
    from models.baseline import create_cascade
    from models.registry import model_from_checkpoint

    state_dict, which = checkpoint_weights(dict(checkpoint), weights, source)
    model_name = checkpoint_model_name(checkpoint, source, name, default_name)
    if checkpoint.get("model_name") is not None:
        model = model_from_checkpoint(dict(checkpoint), **overrides)
    else:
        recorded = {k: v for k, v in _original_options(checkpoint).items() if k != "model_name"}
        kwargs = {"num_classes": head_classes(state_dict) or 1000, "img_size": 224, **(defaults or {}), **recorded,
                  **overrides}
        model = create_cascade(model_name, **kwargs)
    load_weights(model, state_dict)
    return model.eval(), which


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

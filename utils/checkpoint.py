"""Safe loading of DVT checkpoints (released ``.pth.tar`` files and our own), atomic saving.

Loading never unpickles arbitrary objects: ``torch.load(weights_only=True)`` with only numpy
scalars, arrays and dtypes allowed beyond tensors and plain containers (the released files
may hold numpy numbers in their result lists).
"""
from __future__ import annotations

import functools
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch

STATE_DICT_KEYS = ("model_state_dict", "state_dict", "model", "state_dict_ema", "model_ema")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, unsafe, or not for this model."""


def _numpy_safe_globals() -> list:
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    safe = [multiarray.scalar, multiarray._reconstruct, np.ndarray, np.dtype]
    # Files written with numpy < 2 name the same functions under numpy.core.
    safe += [(multiarray.scalar, "numpy.core.multiarray.scalar"),
             (multiarray._reconstruct, "numpy.core.multiarray._reconstruct")]
    safe += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return safe


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Read a checkpoint with ``weights_only=True``.

    Raises:
        CheckpointError: the file is missing, not a checkpoint, or holds pickled objects
            other than tensors, numbers, strings, containers and numpy values.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
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

"""Model weights in checkpoints, and the model rebuilt from any checkpoint.

Four layouts are read: the released ``.pth.tar`` files (``model_state_dict`` and results,
original key names), this project's training checkpoints (``format`` ``dvt-train-1``),
the training checkpoints of the original code (timm's checkpoint saver: ``state_dict``,
``state_dict_ema``, ``optimizer``, ``epoch``, ``arch``, ``args``, ...) and plain state dicts."""
from __future__ import annotations

import argparse
import os
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn

from models.dvt import checkpoint_filter_fn
from models.factory import create_cascade, describe_guess, guess_model, is_cascade_name, model_from_checkpoint
from models.pretrained import state_dict_in, state_dict_mismatch
from models.registry import MODEL_CFGS

from ..errors import CheckpointError
from .files import load_checkpoint_file

CHECKPOINT_FORMAT = "dvt-train-1"
# Keys that timm's checkpoint saver (which the original training script uses) writes next to
# its ``state_dict``; ``state_dict_ema`` only when the run kept a model EMA.
ORIGINAL_TRAINING_KEYS = ("state_dict_ema", "optimizer", "epoch", "arch", "args", "version")


def extract_state_dict(checkpoint: Mapping[str, Any], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The model weights in a checkpoint: under ``model_state_dict``, ``state_dict`` or
    ``model``, or the checkpoint itself when it is a plain state dict."""
    try:
        return state_dict_in(checkpoint)
    except KeyError as e:
        raise CheckpointError(f"{source} has {e.args[0]}") from None


def check_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise a :class:`CheckpointError` naming the missing, unexpected and mis-shaped keys
    when ``state_dict`` (any layout ``model.load_state_dict`` accepts) does not fit ``model``."""
    given = checkpoint_filter_fn(dict(state_dict)) if hasattr(model, "stages") else dict(state_dict)
    expected = model.state_dict()
    mismatch = state_dict_mismatch(given, expected)
    if mismatch:
        name = getattr(model, "model_name", type(model).__name__)
        guess = guess_model(given)
        hint = describe_guess(guess) if guess else None
        hint = f" It looks like a checkpoint for {hint}." if hint and hint != name else ""
        if not hint and _other_image_size(given, expected):
            hint = " Only the patch embeddings differ: the weights are for another image size; pass the one they have."
        if not hint and hasattr(model, "stages") and _single_exit_layout(given):
            hint = (" These are a single-exit model's weights (timm's layout: blocks.*, no stages.*): evaluate it as a "
                    f"one-exit baseline with --model and its timm name{_timm_name_hint(given)}.")
        raise CheckpointError(f"checkpoint does not fit {name}: {mismatch}.{hint}")


def _single_exit_layout(given: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith("blocks.") for k in given) and not any(k.startswith("stages.") for k in given)


def _timm_name_hint(given: Mapping[str, torch.Tensor]) -> str:
    """``, e.g. vit_small_patch16_224`` for a ViT's weights whose width and patch are timm's, else nothing."""
    patch = given.get("patch_embed.proj.weight")
    sizes = {192: "tiny", 384: "small", 768: "base", 1024: "large"}
    if patch is None or patch.dim() != 4 or patch.shape[0] not in sizes:
        return ""
    return f", e.g. vit_{sizes[patch.shape[0]]}_patch{patch.shape[-1]}_224"


def _other_image_size(given: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> bool:
    """Whether the same keys differ only in the shapes of patch embeddings and position tables,
    which are all that a ViT cascade's image size changes."""
    differ = [k for k, v in expected.items() if k in given and given[k].shape != v.shape]
    return set(given) == set(expected) and bool(differ) and all("patch_embed" in k or "pos_embed" in k for k in differ)


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
    weights loaded, in eval mode on the CPU, frozen (``requires_grad=False``: what CPU
    inference packs, :func:`models.layers.packed_weight`); and which weights were used
    (``"model"`` or ``"ema"``).

    Args:
        checkpoint: the loaded checkpoint dictionary.
        source: its file name, for messages.
        name: a model name the checkpoint's own (``model_name``) must agree with.
        default_name: the model to build when neither the checkpoint nor ``name`` names one and
            its weights fit no single registered cascade (:func:`models.factory.guess_model`).
        weights: ``"auto"``, ``"model"`` or ``"ema"`` (see :func:`checkpoint_weights`).
        defaults: constructor arguments for checkpoints that do not store theirs (released
            files); ``num_classes`` defaults to the size of the heads, ``img_size`` to 224.
        overrides: constructor arguments that replace the stored ones (e.g. ``img_size``).
    """
    state_dict, which = checkpoint_weights(dict(checkpoint), weights, source)
    if checkpoint.get("model_name") is None and not _original_options(checkpoint):
        guess = guess_model(state_dict)  # a released file: it does not name its model, nor its reuse switches
        if guess is not None and name in (None, guess[0]):  # an ablation's weights (a reuse path off) build it
            default_name, defaults = guess[0], {**guess[1], **(defaults or {})}
    model_name = checkpoint_model_name(checkpoint, source, name, default_name)
    if checkpoint.get("model_name") is not None:
        model = model_from_checkpoint(dict(checkpoint), **overrides)
    else:
        recorded = {k: v for k, v in _original_options(checkpoint).items() if k != "model_name"}
        kwargs = {"num_classes": head_classes(state_dict) or 1000, "img_size": 224, **(defaults or {}), **recorded,
                  **overrides}
        model = create_cascade(model_name, **kwargs)
    load_weights(model, state_dict)
    return model.eval().requires_grad_(False), which

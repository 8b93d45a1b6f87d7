"""Pretrained configurations of the DVT cascades and the filter timm's loader applies to a
weight file.

timm loads a file named by ``pretrained_cfg_overlay=dict(file=PATH)`` with
``torch.load(weights_only=True)`` and hands the result to :func:`pretrained_filter_fn`, which
accepts every layout this project reads: a released ``.pth.tar`` (weights under
``model_state_dict``, original key names, with or without ``module.``), a training checkpoint
of ours (timm has already picked ``model_ema`` or ``model``), or a plain state dict.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn

from .dvt import checkpoint_filter_fn

__all__ = ["STATE_DICT_KEYS", "numpy_safe_globals", "pretrained_cfg", "pretrained_filter_fn", "state_dict_in",
           "state_dict_mismatch"]

STATE_DICT_KEYS = ("model_state_dict", "state_dict", "model", "state_dict_ema", "model_ema")
"""Where checkpoints keep their weights, in the order they are looked for."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def numpy_safe_globals() -> list:
    """numpy scalar, array and dtype constructors, safe to allow under ``weights_only=True``:
    checkpoints may hold numpy numbers in their result lists and RNG states."""
    try:
        from numpy._core import multiarray  # numpy >= 1.26 (1.26's numpy._core loads it only on import)
    except ImportError:
        from numpy.core import multiarray
    safe = [multiarray.scalar, multiarray._reconstruct, np.ndarray, np.dtype]
    # Files written with numpy < 2 name the same functions under numpy.core.
    safe += [(multiarray.scalar, "numpy.core.multiarray.scalar"),
             (multiarray._reconstruct, "numpy.core.multiarray._reconstruct")]
    safe += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return safe


def pretrained_cfg(backbone: str, num_exits: int, num_classes: int = 1000, img_size: int = 224) -> dict[str, Any]:
    """timm ``pretrained_cfg`` of a cascade. No weights are downloaded (``url`` is empty); a
    local file is given with ``pretrained_cfg_overlay=dict(file=PATH)``.

    Args:
        backbone: ``"vit"`` or ``"t2t"``: names the layers that see the pixels (``first_conv``).
        num_exits: number of stages; every stage's head is a classifier.
        num_classes: classes of the pretrained heads.
        img_size: training resolution; the token grids depend on it (``fixed_input_size``).
    """
    # The T2T stages read pixels through an unfold and a linear layer, not a convolution.
    first = "tokens_to_token.attention1.kqv" if backbone == "t2t" else "patch_embed.proj"
    return dict(
        url="", num_classes=num_classes, input_size=(3, img_size, img_size), pool_size=None,
        fixed_input_size=True, interpolation="bicubic", crop_pct=0.875, crop_mode="center",
        mean=IMAGENET_MEAN, std=IMAGENET_STD,
        first_conv=tuple(f"stages.{k}.{first}" for k in range(num_exits)),
        classifier=tuple(f"stages.{k}.head" for k in range(num_exits)),
        paper_name="Not All Images are Worth 16x16 Words: Dynamic Transformers for Efficient Image Recognition",
        paper_ids="arXiv:2105.15075",
    )


def state_dict_in(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint dictionary: under one of :data:`STATE_DICT_KEYS`, or
    the dictionary itself when it is a plain state dict.

    Raises:
        KeyError: no model weights (the message lists the keys found).
    """
    for key in STATE_DICT_KEYS:
        if isinstance(checkpoint.get(key), Mapping):
            return dict(checkpoint[key])
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return dict(checkpoint)
    raise KeyError(f"no model weights: expected one of the keys {', '.join(STATE_DICT_KEYS)}; "
                   f"found {', '.join(map(str, list(checkpoint)[:10]))}")


def _listed(keys: list[str], limit: int) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def state_dict_mismatch(given: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                        spared: tuple[str, ...] = (), source: str = "checkpoint") -> str:
    """What keeps ``given`` weights from loading into a model whose state dict is ``expected``:
    the missing, unexpected and mis-shaped keys (those starting with a prefix in ``spared``
    excepted), as one phrase; "" when they fit.

    Args:
        given: the weights, already in the model's key layout.
        expected: the model's state dict.
        spared: key prefixes not compared (heads that are replaced, adapted input layers).
        source: what the shapes of ``given`` are called in the message ("checkpoint", "file").
    """
    missing = [k for k in expected if k not in given and not k.startswith(spared)]
    unexpected = [k for k in given if k not in expected and not k.startswith(spared)]
    misshaped = [f"{k} ({source} {tuple(given[k].shape)}, model {tuple(v.shape)})" for k, v in expected.items()
                 if k in given and tuple(given[k].shape) != tuple(v.shape) and not k.startswith(spared)]
    return "; ".join(f"{label} [{len(keys)}]: {_listed(keys, limit)}"
                     for label, keys, limit in (("missing keys", missing, 8), ("unexpected keys", unexpected, 8),
                                                ("mis-shaped keys", misshaped, 4)) if keys)


def pretrained_filter_fn(checkpoint: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn``: any accepted checkpoint -> this model's state dict.

    Converts the original key layout, checks every key and shape against ``model`` (the
    classifier heads and, when timm adapts them to other input channels, the first layers
    excepted) and raises one ``ValueError`` naming what does not fit. It records the number
    of classes of the file's heads as the pretrained ``num_classes``, so timm keeps heads
    that fit the model and replaces them when the model asks for other classes.
    """
    try:
        weights = state_dict_in(checkpoint)
    except KeyError as e:
        raise ValueError(f"the pretrained file has {e.args[0]}") from None
    given = checkpoint_filter_fn(weights, model)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    heads = tuple(cfg.get("classifier") or ())
    first = tuple(cfg.get("first_conv") or ())
    mismatch = state_dict_mismatch(given, model.state_dict(), tuple(f"{name}." for name in heads + first), "file")
    if mismatch:
        name = cfg.get("architecture") or type(model).__name__
        raise ValueError(f"the pretrained file does not fit {name}: {mismatch}")
    head_weights = [given.get(f"{h}.weight") for h in heads]
    if head_weights and all(w is not None for w in head_weights):
        # timm compares this with the model's classes: equal keeps the file's heads, else drops them.
        cfg["num_classes"] = int(head_weights[0].shape[0])
    return given

"""Building a cascade by name, from a checkpoint's record of it, or from its weights alone.

``create_cascade(name)`` builds a registered DVT cascade or wraps any other timm classifier as
a one-exit :class:`models.baseline.SingleExit`; ``model_from_checkpoint`` rebuilds what a
checkpoint of this project records (``model_name``, ``model_kwargs``); ``guess_model`` names
the registered cascade whose configuration a state dict has (for released files, which do not
name their model).
"""
from __future__ import annotations

import difflib
from typing import Any, Mapping, Optional

import timm
import torch
import torch.nn as nn

from .baseline import SingleExit
from .dvt import checkpoint_filter_fn
from .registry import MODEL_CFGS, TIMM_ARGS, build_dvt

__all__ = ["create_cascade", "describe_guess", "guess_model", "is_cascade_name", "is_single_exit",
           "model_from_checkpoint", "unknown_model_message"]

_SWITCHES = ("feature_reuse", "relation_reuse")


def is_cascade_name(name: str) -> bool:
    """Whether ``name`` is a registered DVT cascade or a timm model usable as a baseline."""
    return name in MODEL_CFGS or timm.is_model(name)


def unknown_model_message(name: str) -> str:
    """The error for a ``name`` that :func:`is_cascade_name` refuses, with the nearest known name."""
    close = difflib.get_close_matches(name, list(MODEL_CFGS) + timm.list_models(), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown model {name!r}{hint}: neither a DVT model ({', '.join(MODEL_CFGS)}) nor a timm model"


def is_single_exit(name: str) -> bool:
    """Whether the timm model ``name`` is a plain classifier (wrapped as a baseline) rather than
    a cascade registered under another name; built on the meta device, so it costs no memory."""
    if name in MODEL_CFGS:
        return False
    with torch.device("meta"):
        return not hasattr(timm.create_model(name), "num_exits")


def create_cascade(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """A registered DVT cascade by name, or any other timm classifier as a :class:`SingleExit`.

    Args:
        name: a DVT model (``DVT_T2t_vit_12``, ...) or a timm model (``deit_small_patch16_224``, ...).
        pretrained: as in ``timm.create_model``.
        kwargs: constructor arguments. For a baseline, ``feature_reuse`` and ``relation_reuse``
            (switches of the cascades) must be absent or true.
    """
    if name in MODEL_CFGS:
        return build_dvt(name, pretrained, **kwargs)
    if not timm.is_model(name):
        raise ValueError(unknown_model_message(name))
    model_kwargs = {k: v for k, v in kwargs.items() if k not in TIMM_ARGS}
    switches = {k: kwargs.pop(k) for k in _SWITCHES if k in kwargs}
    net = timm.create_model(name, pretrained=pretrained, **kwargs)
    if hasattr(net, "num_exits"):  # a cascade registered under another name: it takes the switches
        return timm.create_model(name, pretrained=pretrained, **kwargs, **switches) if switches else net
    for switch, value in switches.items():
        if value is not True:
            raise ValueError(f"{name} is a single-exit model: it has no {switch.replace('_', ' ')} to switch off")
    size = kwargs.get("img_size") or net.pretrained_cfg["input_size"][-1]
    model = SingleExit(net, int(size if isinstance(size, int) else size[-1]))
    model.model_name = name
    model.model_kwargs = model_kwargs
    return model


def model_from_checkpoint(checkpoint: Mapping[str, Any], name: Optional[str] = None, **overrides: Any) -> nn.Module:
    """Rebuild the model described by a checkpoint written by this project (``model_name``
    and ``model_kwargs`` entries): a cascade, or a single-exit baseline; ``name`` is required
    for files that do not carry them."""
    name = checkpoint.get("model_name", name)
    if name is None:
        raise ValueError("the checkpoint does not name its model; pass the model name")
    kwargs = dict(checkpoint.get("model_kwargs", {}))
    kwargs.update(overrides)
    return create_cascade(name, **kwargs)


def guess_model(state_dict: Mapping[str, torch.Tensor]) -> Optional[tuple[str, dict[str, bool]]]:
    """The registered cascade whose configuration the weights have (stage type and count,
    width, depth), with their reuse switches; None when no single cascade fits. Any key layout
    (original or ours) and any image size: only the structure is compared."""
    weights = checkpoint_filter_fn(dict(state_dict))
    cls_token = weights.get("stages.0.cls_token")
    if cls_token is None:
        return None
    stages = {int(k.split(".")[1]) for k in weights if k.startswith("stages.")}
    depth = len({k.split(".")[3] for k in weights if k.startswith("stages.0.blocks.")})
    backbone = "t2t" if any(".tokens_to_token." in k for k in weights) else "vit"
    fits = [name for name, cfg in MODEL_CFGS.items()
            if (cfg["backbone"], cfg["embed_dim"], cfg["depth"], len(cfg.get("t2t_geometries") or cfg["grids"]))
            == (backbone, cls_token.shape[-1], depth, len(stages))]
    if len(fits) != 1:
        return None
    switches = dict(feature_reuse=any(".feature_reuse_mlp." in k for k in weights),
                    relation_reuse=any(".relation_reuse_conv." in k for k in weights))
    return fits[0], switches


def describe_guess(guess: tuple[str, dict[str, bool]]) -> str:
    """``DVT_T2t_vit_12``, or ``DVT_T2t_vit_12 (feature_reuse=False, relation_reuse=True)``
    when a reuse path is switched off."""
    name, switches = guess
    if all(switches.values()):
        return name
    return f"{name} ({', '.join(f'{k}={v}' for k, v in switches.items())})"

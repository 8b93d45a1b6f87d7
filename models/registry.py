"""Named DVT cascades, registered in timm: ``timm.create_model("DVT_T2t_vit_12", ...)``.

Each factory is only a configuration passed to :class:`models.dvt.DVT` through timm's
``build_model_with_cfg``; keyword arguments override it (``num_classes``, ``feature_reuse``,
``relation_reuse``, ``drop_path_rate``, ``img_size``, ...). A local weight file loads the timm
way::

    timm.create_model("DVT_T2t_vit_12", pretrained=True,
                      pretrained_cfg_overlay=dict(file="DVT_T2t_vit_12.pth.tar"))
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg

from .dvt import DVT
from .pretrained import numpy_safe_globals, pretrained_cfg, pretrained_filter_fn

T2T_12 = dict(backbone="t2t", embed_dim=256, depth=12, num_heads=4, mlp_ratio=2., qkv_bias=False, norm_eps=1e-5)
T2T_14 = dict(backbone="t2t", embed_dim=384, depth=14, num_heads=6, mlp_ratio=3., qkv_bias=False, norm_eps=1e-5)
DEIT_S = dict(backbone="vit", embed_dim=384, depth=12, num_heads=6, mlp_ratio=4., qkv_bias=True, norm_eps=1e-6)
VIT_B = dict(backbone="vit", embed_dim=768, depth=12, num_heads=12, mlp_ratio=4., qkv_bias=True, norm_eps=1e-6)

MODEL_CFGS: dict[str, dict] = {
    # The released three-exit cascades: 7x7 -> 10x10 -> 14x14 tokens.
    "DVT_T2t_vit_12": dict(T2T_12, t2t_geometries=((14, 8, 3), (11, 6, 5), (7, 4, 2))),
    "DVT_T2t_vit_14": dict(T2T_14, t2t_geometries=((14, 8, 3), (11, 6, 5), (7, 4, 2))),
    "DVT_Deit_small": dict(DEIT_S, grids=(7, 10, 14)),
    # Two-exit cascades, 7x7 -> 14x14 tokens (patch 32, then 16 at 224 pixels).
    "DVT_Deit_small_49_196": dict(DEIT_S, grids=(7, 14)),
    "DVT_Vit_base_49_196": dict(VIT_B, grids=(7, 14)),
    # A small cascade for tests and CPU demos.
    "DVT_tiny": dict(backbone="vit", embed_dim=64, depth=3, num_heads=2, mlp_ratio=2., qkv_bias=True,
                     norm_eps=1e-6, grids=(7, 10, 14), reuse_dim=16, reuse_hidden=32),
}

default_cfgs = generate_default_cfgs({
    name: pretrained_cfg(cfg["backbone"], len(cfg.get("t2t_geometries") or cfg["grids"]))
    for name, cfg in MODEL_CFGS.items()})


# Arguments of timm's builder, not of the model (``pretrained_model_args``: what a model folder's
# config.json records, passed on by ``timm.create_model("local-dir:...")``).
TIMM_ARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "pretrained_model_args")


def _square(img_size: int | Sequence[int]) -> int:
    """timm passes ``img_size`` as (H, W); a cascade's token grids need square images."""
    if isinstance(img_size, int):
        return img_size
    size = tuple(img_size)
    if len(size) != 2 or size[0] != size[1]:
        raise ValueError(f"DVT models take square images; got img_size={img_size}")
    return int(size[0])


def _dvt(**kwargs) -> DVT:
    if "img_size" in kwargs:
        kwargs["img_size"] = _square(kwargs["img_size"])
    return DVT(**kwargs)


def build_dvt(name: str, pretrained: bool = False, **kwargs) -> DVT:
    """Build a registered cascade by name through timm's builder; keyword arguments override
    its configuration.

    Args:
        name: a key of :data:`MODEL_CFGS`.
        pretrained: load the file named by ``pretrained_cfg_overlay=dict(file=PATH)`` (a
            released ``.pth.tar`` or a checkpoint of ours); nothing is downloaded.
        kwargs: :class:`models.dvt.DVT` arguments, plus timm's ``pretrained_cfg``,
            ``pretrained_cfg_overlay`` and ``cache_dir``.
    """
    if name not in MODEL_CFGS:
        raise ValueError(f"unknown DVT model {name!r}; choose one of: {', '.join(MODEL_CFGS)}")
    if kwargs.get("features_only"):
        raise ValueError(f"{name} has no features_only mode (its stages are separate transformers, not one "
                         "feature pyramid): model.forward_features(x) gives each stage's final tokens")
    timm_args = {k: kwargs.pop(k) for k in TIMM_ARGS if k in kwargs}
    model_kwargs = dict(kwargs)  # what a checkpoint needs to rebuild this model
    if pretrained:
        _check_pretrained_source(name, timm_args, kwargs)
    # Released files may hold numpy numbers; allowing them keeps timm's weights_only load safe.
    with torch.serialization.safe_globals(numpy_safe_globals()):
        model = build_model_with_cfg(
            _dvt, name, pretrained, pretrained_filter_fn=pretrained_filter_fn, **timm_args,
            **{**MODEL_CFGS[name], **kwargs})
    model.model_name = name
    model.model_kwargs = model_kwargs
    return model


def _check_pretrained_source(name: str, timm_args: dict, kwargs: dict) -> None:
    """Clear errors before timm's: no weights to download, a missing file, a T2T input
    layer that cannot be adapted to other channels."""
    cfg = resolve_pretrained_cfg(name, timm_args.get("pretrained_cfg"), timm_args.get("pretrained_cfg_overlay"))
    if cfg.state_dict is None and not cfg.file:
        raise ValueError(
            f"{name}: weights are not downloaded; name a released or trained checkpoint with "
            "pretrained_cfg_overlay=dict(file=PATH), or load one with utils.checkpoint.load_checkpoint(model, path)")
    if cfg.source == "local-dir":  # a model folder (config.json + model.safetensors)
        if not os.path.isfile(os.path.join(cfg.file or "", "model.safetensors")):
            raise FileNotFoundError(f"no model.safetensors in the model folder {cfg.file}")
    elif cfg.file and not os.path.isfile(cfg.file):
        raise FileNotFoundError(f"pretrained file not found: {cfg.file}")
    if MODEL_CFGS[name]["backbone"] == "t2t" and kwargs.get("in_chans", cfg.input_size[0]) != cfg.input_size[0]:
        raise ValueError(f"{name}: pretrained T2T weights need in_chans={cfg.input_size[0]}")


@register_model
def DVT_T2t_vit_12(pretrained: bool = False, **kwargs) -> DVT:
    return build_dvt("DVT_T2t_vit_12", pretrained, **kwargs)


@register_model
def DVT_T2t_vit_14(pretrained: bool = False, **kwargs) -> DVT:
    return build_dvt("DVT_T2t_vit_14", pretrained, **kwargs)


@register_model
def DVT_Deit_small(pretrained: bool = False, **kwargs) -> DVT:
    return build_dvt("DVT_Deit_small", pretrained, **kwargs)


@register_model
def DVT_Deit_small_49_196(pretrained: bool = False, **kwargs) -> DVT:
    return build_dvt("DVT_Deit_small_49_196", pretrained, **kwargs)


@register_model
def DVT_Vit_base_49_196(pretrained: bool = False, **kwargs) -> DVT:
    return build_dvt("DVT_Vit_base_49_196", pretrained, **kwargs)


@register_model
def DVT_tiny(pretrained: bool = False, **kwargs) -> DVT:
    return build_dvt("DVT_tiny", pretrained, **kwargs)

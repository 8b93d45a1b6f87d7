"""Named DVT cascades, registered in timm: ``timm.create_model("DVT_T2t_vit_12", ...)``.

Each factory is only a configuration passed to :class:`models.dvt.DVT`; keyword arguments
override it (``num_classes``, ``feature_reuse``, ``relation_reuse``, ``drop_path_rate``,
``img_size``, ...).
"""
from __future__ import annotations

from typing import Optional

from timm.models import register_model

from .dvt import DVT

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

_TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def build_dvt(name: str, pretrained: bool = False, **kwargs) -> DVT:
    """Build a registered cascade by name; keyword arguments override its configuration."""
    if name not in MODEL_CFGS:
        raise ValueError(f"unknown DVT model {name!r}; choose one of: {', '.join(MODEL_CFGS)}")
    if pretrained:
        raise ValueError(
            f"{name}: weights are not downloaded; build the model and load a released checkpoint "
            "with utils.checkpoint.load_checkpoint(model, path)")
    for key in _TIMM_ONLY_KWARGS:
        kwargs.pop(key, None)
    model = DVT(**{**MODEL_CFGS[name], **kwargs})
    model.default_cfg = model.pretrained_cfg
    model.model_name = name
    model.model_kwargs = dict(kwargs)  # what a checkpoint needs to rebuild this model
    return model


def model_from_checkpoint(checkpoint: dict, name: Optional[str] = None, **overrides) -> DVT:
    """Rebuild the model described by a checkpoint written by this project (``model_name``
    and ``model_kwargs`` entries); ``name`` is required for files that do not carry them."""
    name = checkpoint.get("model_name", name)
    if name is None:
        raise ValueError("the checkpoint does not name its model; pass the model name")
    kwargs = dict(checkpoint.get("model_kwargs", {}))
    kwargs.update(overrides)
    return build_dvt(name, **kwargs)


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

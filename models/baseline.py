"""Single-exit timm classifiers as one-exit cascades, so that the training and evaluation
pipeline of the cascades runs baselines unchanged (``deit_small_patch16_224``,
``vit_base_patch32_224``, ...): one tuple of logits per forward, one exit, one "stage".

:func:`models.factory.create_cascade` wraps any timm model that is not a cascade. The wrapped
network is ``stages[0]``; its state dict carries the timm model's own keys (no prefix), so a
checkpoint of a baseline also loads into the plain timm model.
"""
from __future__ import annotations

import re
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from .dvt import EarlyExitOutput

__all__ = ["SingleExit"]

_PREFIX = "stages.0."


def _prefixed(pattern: str) -> str:
    """A parameter-name regex of the wrapped network -> the same regex for the wrapper."""
    return rf"^{re.escape(_PREFIX)}(?:{pattern.removeprefix('^')})"


class SingleExit(nn.Module):
    """A timm classifier seen as a cascade with one exit.

    Args:
        net: a timm classification model (``num_classes``, ``forward_features``, ``forward_head``).
        img_size: its input resolution.
    """

    def __init__(self, net: nn.Module, img_size: int) -> None:
        super().__init__()
        self.stages = nn.ModuleList([net])
        self.img_size = img_size
        self.num_classes = net.num_classes
        self.num_features = getattr(net, "num_features", None)
        self.pretrained_cfg = dict(getattr(net, "pretrained_cfg", {}))
        self.grids: tuple[int, ...] = ()
        self.register_state_dict_post_hook(_strip_prefix)
        self.register_load_state_dict_pre_hook(_add_prefix)

    @property
    def num_exits(self) -> int:
        return 1

    @property
    def net(self) -> nn.Module:
        return self.stages[0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        """Images (B, 3, H, W) -> a one-element tuple of (B, num_classes) logits."""
        return (self.net(x),)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.net.forward_features(x),)

    def forward_head(self, features: Sequence[torch.Tensor], pre_logits: bool = False) -> tuple[torch.Tensor]:
        return (self.net.forward_head(features[0], pre_logits=pre_logits),)

    @torch.no_grad()
    def forward_early_exit(self, x: torch.Tensor, thresholds: Sequence[float] | torch.Tensor) -> EarlyExitOutput:
        """Every sample leaves at the only exit (the threshold is not read)."""
        if len(thresholds) != 1:
            raise ValueError(f"expected 1 threshold, got {len(thresholds)}")
        logits = self.net(x)
        confidence = logits.float().softmax(dim=-1).amax(dim=-1)
        return EarlyExitOutput(logits, torch.zeros(x.shape[0], dtype=torch.long, device=x.device), confidence)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        names = self.net.no_weight_decay() if hasattr(self.net, "no_weight_decay") else ()
        return {_PREFIX + n for n in names}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """The wrapped network's parameter groups (layer-wise learning-rate decay)."""
        matcher = self.net.group_matcher(coarse=coarse)
        out: dict[str, Any] = {}
        for group, spec in matcher.items():
            if isinstance(spec, str):
                out[group] = _prefixed(spec)
            elif spec is not None:
                out[group] = [(_prefixed(pattern), suffix) for pattern, suffix in spec]
        return out

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.net.set_grad_checkpointing(enable)

    def get_classifier(self) -> nn.Module:
        return self.net.get_classifier()

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is None:
            self.net.reset_classifier(num_classes)
        else:
            self.net.reset_classifier(num_classes, global_pool)
        self.num_classes = num_classes


def _strip_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict hook: ``stages.0.<key>`` -> ``<key>``, the wrapped model's own names."""
    full = prefix + _PREFIX
    keys = [k for k in state_dict if k.startswith(prefix)]
    items = [(prefix + k[len(full):] if k.startswith(full) else k, state_dict.pop(k)) for k in keys]
    state_dict.update(items)


def _add_prefix(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """Load-time hook: the wrapped model's names (with or without ``module.``) -> ``stages.0.<key>``."""
    full = prefix + _PREFIX
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(full)]:
        rest = key[len(prefix):]
        for wrapper in ("module.", "_orig_mod."):
            rest = rest.removeprefix(wrapper)
        state_dict[full + rest.removeprefix(_PREFIX)] = state_dict.pop(key)

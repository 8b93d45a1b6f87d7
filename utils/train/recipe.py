"""The training recipe's parts built from main.py's options, as timm builds them: parameter
groups, optimizer, learning-rate schedule, model EMA, mixup and the loss, new heads."""
from __future__ import annotations

import argparse
import difflib
from typing import Any, Optional

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

from ..errors import ConfigError
from .guard import fused_kwargs

# The names timm's create_scheduler_v2 accepts (timm 1.0), for the message that lists them;
# whether a name is accepted is timm's to say (check_scheduler).
SCHEDULERS = ("cosine", "tanh", "step", "multistep", "plateau", "poly", "wsd", "rsqrt", "constant", "none")


def init_head_(head: nn.Module) -> None:
    """The DVT initialisation for a new classifier (truncated normal 0.02, zero bias)."""
    from timm.layers import trunc_normal_

    if isinstance(head, nn.Linear):
        trunc_normal_(head.weight, std=.02)
        nn.init.zeros_(head.bias)


def param_groups(model: nn.Module, weight_decay: float, backbone_lr_scale: float = 1.0) -> list[dict]:
    """Parameter groups: no weight decay for 1-d parameters, biases and the model's
    ``no_weight_decay()`` names (timm's rule); the parameters outside the classifier heads get
    ``lr_scale = backbone_lr_scale`` (timm schedulers multiply the learning rate by it)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (param.ndim <= 1 or name.endswith(".bias") or name in skip)
        head = ".head." in f".{name}"
        groups.setdefault((head, decay), []).append(param)
    out = []
    for (head, decay), params in sorted(groups.items()):
        group = {"params": params, "weight_decay": weight_decay if decay else 0.}
        if not head and backbone_lr_scale != 1.0:
            group["lr_scale"] = backbone_lr_scale
        out.append(group)
    return out


def scaled_lr(args: argparse.Namespace, world_size: int) -> float:
    """``--lr``, or ``--lr-base`` x global batch / ``--lr-base-size`` when that is set (DeiT's linear
    scaling; the global batch counts the batches each update sums, ``--grad-accum-steps``)."""
    if args.lr_base is None:
        return args.lr
    return args.lr_base * global_batch(args, world_size) / args.lr_base_size


def global_batch(args: argparse.Namespace, world_size: int) -> int:
    """Images per optimizer update: batch size x processes x ``--grad-accum-steps``."""
    return args.batch_size * world_size * args.grad_accum_steps


def build_optimizer(args: argparse.Namespace, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """timm's optimizer ``--opt`` over :func:`param_groups`, or with ``--layer-decay`` over
    timm's layer-wise groups (from the model's ``group_matcher``; same weight-decay rule).
    AdamW, Adam and SGD are fused: they then skip a non-finite step on the device (utils.train.guard)."""
    opt_kwargs: dict[str, Any] = {} if getattr(args, "apex_amp", False) else fused_kwargs(args.opt)
    if args.opt_eps is not None:
        opt_kwargs["eps"] = args.opt_eps
    if args.opt_betas is not None:
        opt_kwargs["betas"] = tuple(args.opt_betas)
    if getattr(args, "layer_decay", None) is not None:
        return create_optimizer_v2(model, opt=args.opt, lr=lr, weight_decay=args.weight_decay,
                                   momentum=args.momentum, layer_decay=args.layer_decay, **opt_kwargs)
    return create_optimizer_v2(param_groups(model, args.weight_decay, args.backbone_lr_scale), opt=args.opt,
                               lr=lr, weight_decay=args.weight_decay, momentum=args.momentum, **opt_kwargs)


def build_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer,
                    steps_per_epoch: int) -> tuple[Any, int]:
    """timm's scheduler ``--sched`` and the number of epochs it runs (cool-down included)."""
    try:
        return create_scheduler_v2(
            optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
            cooldown_epochs=args.cooldown_epochs, patience_epochs=args.patience_epochs, decay_rate=args.decay_rate,
            min_lr=args.min_lr, warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, noise=args.lr_noise,
            noise_pct=args.lr_noise_pct, noise_std=args.lr_noise_std, noise_seed=args.seed,
            cycle_mul=args.lr_cycle_mul, cycle_limit=args.lr_cycle_limit,
            plateau_mode="min" if args.eval_metric.endswith("loss") else "max",
            step_on_epochs=True, updates_per_epoch=steps_per_epoch)
    except ValueError as e:
        if f"Unknown scheduler '{args.sched}'" in str(e):
            close = difflib.get_close_matches(args.sched, SCHEDULERS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown --sched {args.sched!r}{hint}; timm's schedulers: {', '.join(SCHEDULERS)}") \
                from None
        raise ConfigError(f"--sched {args.sched}: {e}") from None


def check_scheduler(args: argparse.Namespace) -> None:
    """Raise a ConfigError when timm cannot build ``--sched`` with the run's schedule options:
    the schedule is built once over a stand-in parameter, so timm itself judges the name (it
    keeps no list of its schedulers)."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    build_scheduler(args, optimizer, steps_per_epoch=1)


def build_ema(args: argparse.Namespace, model: nn.Module) -> Optional[ModelEmaV3]:
    """timm's model EMA when ``--model-ema`` (on the CPU with ``--model-ema-force-cpu``)."""
    if not args.model_ema:
        return None
    return ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                      device=torch.device("cpu") if args.model_ema_force_cpu else None)


def mixup_active(args: argparse.Namespace) -> bool:
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def build_mixup_and_loss(args: argparse.Namespace, num_classes: int) -> tuple[Optional[Mixup], nn.Module]:
    """Mixup/cutmix with soft-target cross-entropy when active, else (smoothed) cross-entropy."""
    if mixup_active(args):
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=num_classes)
        return mixup_fn, SoftTargetCrossEntropy()
    if args.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return None, nn.CrossEntropyLoss()

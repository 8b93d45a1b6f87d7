"""The model a training run trains, built from main.py's options: ``--model`` as a DVT cascade
or a timm classifier as a one-exit cascade, started from ``--initial-checkpoint`` or
``--finetune`` weights (new heads when the classes differ), the same on every rank."""
from __future__ import annotations

import argparse
import logging
from typing import Any, Optional

import torch.nn as nn

from models.factory import create_cascade
from models.registry import MODEL_CFGS

from ..checkpoint.files import load_checkpoint_file
from ..checkpoint.weights import checkpoint_weights, head_classes, load_weights
from ..errors import ConfigError
from .recipe import init_head_
from .rng import seed_all

_logger = logging.getLogger("dvt.train")


def create_dvt(args: argparse.Namespace, num_classes: int, **overrides: Any) -> nn.Module:
    """The model named by --model: a DVT cascade, or a timm classifier as a one-exit cascade
    (the reuse switches only exist in the cascades)."""
    kwargs = dict(num_classes=num_classes, img_size=args.img_size, drop_rate=args.drop,
                  attn_drop_rate=args.attn_drop, drop_path_rate=args.drop_path)
    if not (args.feature_reuse and args.relation_reuse) or args.model in MODEL_CFGS:
        kwargs.update(feature_reuse=args.feature_reuse, relation_reuse=args.relation_reuse)
    kwargs.update(args.model_kwargs, **overrides)
    try:
        return create_cascade(args.model, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--model {args.model}: {e}") from None


def start_weights(args: argparse.Namespace, checkpoint: dict) -> tuple[dict, str]:
    """The weights a run starts from in the --initial-checkpoint or --finetune ``checkpoint``,
    and which they are (``"model"`` or ``"ema"``)."""
    path = args.initial_checkpoint or args.finetune
    # as timm: an initial checkpoint gives its model weights; fine-tuning starts from the EMA
    # weights when there are some (as T2T-ViT's transfer script)
    return checkpoint_weights(checkpoint, "auto" if args.finetune else "model", path)


def load_start_weights(model: nn.Module, args: argparse.Namespace, num_classes: int,
                       checkpoint: Optional[dict] = None) -> nn.Module:
    """--initial-checkpoint (same heads) or --finetune (new heads when the classes differ);
    ``checkpoint``: that file when already read."""
    path = args.initial_checkpoint or args.finetune
    weights, which = start_weights(args, checkpoint if checkpoint is not None else load_checkpoint_file(path))
    if args.finetune:
        source_classes = head_classes(weights) or num_classes
        if source_classes != num_classes:
            model = create_dvt(args, source_classes)
        load_weights(model, weights)
        if source_classes != num_classes:
            model.reset_classifier(num_classes)
            for stage in model.stages:
                init_head_(stage.head)
            model.model_kwargs["num_classes"] = num_classes
        _logger.info(f"fine-tuning from {path} ({which} weights, {source_classes} -> {num_classes} classes)")
    else:
        load_weights(model, weights)
        _logger.info(f"initial weights from {path} ({which} weights)")
    return model


def initial_model(args: argparse.Namespace, num_classes: int, start_checkpoint: Optional[dict] = None) -> nn.Module:
    """--model with its starting weights (``start_checkpoint``: the --initial-checkpoint or
    --finetune file when already read), the same on every rank (so is the EMA made from it)."""
    seed_all(args.seed)
    model = create_dvt(args, num_classes)
    if args.initial_checkpoint or args.finetune:
        model = load_start_weights(model, args, num_classes, start_checkpoint)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    check_eval_metric(args, model.num_exits)
    return model


def check_eval_metric(args: argparse.Namespace, num_exits: int) -> None:
    """Raise a ConfigError unless --eval-metric names a metric of a model with ``num_exits`` exits."""
    metric_names = {"loss", "top1", "top5", f"exit{num_exits}_top5"} | {
        f"exit{k}_{m}" for k in range(1, num_exits + 1) for m in ("top1", "loss")}
    if args.eval_metric not in metric_names:
        raise ConfigError(f"--eval-metric {args.eval_metric!r}: {args.model} has {num_exits} exits; "
                          f"choose one of {', '.join(sorted(metric_names))}")

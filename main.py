"""Train a DVT cascade, resume it exactly, fine-tune it on CIFAR, export the released file.

The original command works unchanged, and so do torchrun and a plain single process::

    python -m torch.distributed.launch --nproc_per_node=8 main.py PATH --model DVT_T2t_vit_12 \\
        --b 128 --lr 2e-3 --weight-decay .03 --amp --img-size 224
    torchrun --nproc_per_node=8 main.py PATH --config configs/DVT_T2t_vit_12.yaml
    python main.py PATH --config configs/tiny_cpu.yaml --device cpu

``PATH`` holds ``train/`` and ``val/`` ImageFolders (or CIFAR in torchvision's format with
``--dataset cifar10|cifar100``). ``--config FILE`` sets the defaults (keys are the long flag
names, with ``-`` or ``_``); flags on the command line override it; the resolved
configuration is written to ``config.yaml`` in the run folder. The run folder
``OUTPUT/train/EXPERIMENT`` receives ``last.pth.tar`` and ``best.pth.tar`` (whole training
state), ``summary.csv`` (one row per epoch), ``log.txt`` and, at the end,
``released.pth.tar`` in the layout of the released DVT checkpoints.
"""
from __future__ import annotations

import argparse
import csv
import difflib
import importlib.util
import logging
import os
import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Sequence

import timm
import torch
import torch.nn as nn
import yaml
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, list_optimizers
from timm.scheduler import create_scheduler_v2
from timm.utils import ApexScaler, ModelEmaV3, NativeScaler
from torch.nn.parallel import DistributedDataParallel

import models  # noqa: F401  (registers the DVT models in timm)
from models import model_from_checkpoint
from utils.checkpoint import CheckpointError, load_checkpoint_file, load_weights
from utils.data import DataError, build_split, calibration_transform, eval_transform, seeded_subset, split_dir
from utils.engine import (
    STREAM_CALIB_SAMPLES, STREAM_TRAIN_SAMPLES, ConfigError, DistEnv, EpochSampler, ExitMeter, NonFiniteLossError,
    SeededDataset, ShardSampler, StopSignal, TrainContext, TrainingInterrupted, agreed_flags, broadcast_object,
    checkpoint_weights, cifar_train_transform, cleanup_distributed, default_mean_std, evaluate, export_released,
    format_metrics, head_classes, init_head_, is_training_checkpoint, load_cifar, make_loader, param_groups,
    restore_rng_state, save_training_state, seed_all, setup_distributed, train_one_epoch, training_checkpoint,
)

_logger = logging.getLogger("dvt.train")

AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
DATASETS = ("imagenet", "folder", "cifar10", "cifar100")
CIFAR_NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
CONFIG_FILE = "config.yaml"
LAST, BEST, RELEASED = "last.pth.tar", "best.pth.tar", "released.pth.tar"
NOT_CONFIG = ("help", "config", "local_rank")  # keys a config file cannot set


# --------------------------------------------------------------------------- arguments

def build_parser() -> argparse.ArgumentParser:
    """The command line; names follow the original DVT / timm training script."""
    p = argparse.ArgumentParser(
        description="Train a Dynamic Vision Transformer (DVT) cascade.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-c", "--config", default="", metavar="FILE",
                   help="YAML file of default values (keys: long flag names); command-line flags override it")

    g = p.add_argument_group("data and model")
    g.add_argument("data", nargs="?", default=None, metavar="DIR",
                   help="dataset folder: train/ and val/ ImageFolders, or the CIFAR folder with --dataset cifar*")
    g.add_argument("--data-dir", default=None, metavar="DIR", help="same as the positional DIR")
    g.add_argument("--dataset", default="imagenet", choices=DATASETS,
                   help="imagenet/folder: DIR/train and DIR/val ImageFolders; cifar10/cifar100: torchvision's format")
    g.add_argument("--train-split", default="train", help="training folder inside DIR")
    g.add_argument("--val-split", default="val", help="validation folder inside DIR")
    g.add_argument("--model", default="DVT_T2t_vit_12", metavar="MODEL", help="registered DVT model name")
    g.add_argument("--num-classes", type=int, default=None, metavar="N",
                   help="classes of the heads (default: the dataset's)")
    g.add_argument("--img-size", type=int, default=224, metavar="N", help="input resolution")
    g.add_argument("--crop-pct", type=float, default=None,
                   help="validation center-crop fraction (default 0.875; 1.0 for CIFAR)")
    g.add_argument("--mean", type=float, nargs=3, default=None, metavar="MEAN",
                   help="normalisation mean (default: ImageNet's; CIFAR's for CIFAR)")
    g.add_argument("--std", type=float, nargs=3, default=None, metavar="STD", help="normalisation std")
    g.add_argument("--feature-reuse", action=argparse.BooleanOptionalAction, default=True,
                   help="later stages reuse the previous stage's features")
    g.add_argument("--relation-reuse", action=argparse.BooleanOptionalAction, default=True,
                   help="later stages reuse the previous stage's attention logits")
    g.add_argument("-b", "--batch-size", "--b", dest="batch_size", type=int, default=64, metavar="N",
                   help="batch size per process (--b as in the original README)")
    g.add_argument("-vb", "--validation-batch-size-multiplier", type=int, default=1, metavar="N",
                   help="validation batch size = this x batch size")
    g.add_argument("-j", "--workers", type=int, default=8, metavar="N", help="data loading processes per process")
    g.add_argument("--pin-mem", action=argparse.BooleanOptionalAction, default=None,
                   help="pinned host memory for the loaders (default: on with CUDA)")

    g = p.add_argument_group("checkpoints")
    g.add_argument("--initial-checkpoint", default="", metavar="PATH",
                   help="start from these weights (same classes; released layout or ours)")
    g.add_argument("--finetune", default="", metavar="PATH",
                   help="start from these weights with new heads for the dataset's classes (transfer learning)")
    g.add_argument("--resume", default="", metavar="PATH", help="continue a run exactly from its last.pth.tar")
    g.add_argument("--auto-resume", action="store_true",
                   help="resume from the run folder's last.pth.tar when there is one")
    g.add_argument("--no-resume-opt", action="store_true",
                   help="with --resume: restore the weights and the position only, not optimizer/scaler/scheduler")
    g.add_argument("--start-epoch", type=int, default=None, metavar="N", help="override the epoch to start at")
    g.add_argument("--output", default="./output", metavar="PATH",
                   help="base folder; the run goes to OUTPUT/train/EXPERIMENT")
    g.add_argument("--experiment", default="", metavar="NAME",
                   help="run folder name (default: date-model-size; with --resume, the checkpoint's folder)")
    g.add_argument("--eval-metric", default="top1", metavar="METRIC",
                   help="picks the best checkpoint: top1 (last exit), exit{k}_top1, top5 or loss")
    g.add_argument("--recovery-interval", type=int, default=0, metavar="N",
                   help="also save last.pth.tar every N steps within an epoch")
    g.add_argument("--release", action=argparse.BooleanOptionalAction, default=True,
                   help="write released.pth.tar (released layout: flops, accuracies, thresholds) at the end")
    g.add_argument("--release-weights", default="auto", choices=("auto", "model", "ema"),
                   help="weights of the released file; auto: EMA when EMA is evaluated (it then picks "
                        "the best checkpoint, as in the original), else the model's")
    g.add_argument("--export-released", default="", metavar="CKPT",
                   help="only write the released file of CKPT (ours or released layout), then exit")
    g.add_argument("--released-path", default="", metavar="PATH",
                   help="where --export-released writes (default: released.pth.tar next to CKPT)")
    g.add_argument("--calib-size", type=int, default=50000, metavar="N",
                   help="seeded random training images (training augmentation) used to fit the thresholds")
    g.add_argument("--eval-checkpoint", "--eval_checkpoint", default="", metavar="PATH",
                   help="only evaluate the per-exit accuracy of this checkpoint on the validation set")

    g = p.add_argument_group("optimizer")
    g.add_argument("--opt", default="adamw", metavar="OPTIMIZER", help="timm optimizer name")
    g.add_argument("--opt-eps", type=float, default=None, metavar="EPSILON")
    g.add_argument("--opt-betas", type=float, nargs="+", default=None, metavar="BETA")
    g.add_argument("--momentum", type=float, default=0.9, metavar="M")
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--clip-grad", type=float, default=None, metavar="NORM", help="gradient clipping (off by default)")
    g.add_argument("--clip-mode", default="norm", choices=("norm", "value", "agc"))
    g.add_argument("--lr", type=float, default=5e-4, metavar="LR", help="peak learning rate")
    g.add_argument("--lr-base", type=float, default=None, metavar="LR",
                   help="when set, lr = lr-base x global batch / lr-base-size (DeiT's linear scaling)")
    g.add_argument("--lr-base-size", type=int, default=512, metavar="N")
    g.add_argument("--backbone-lr-scale", type=float, default=1.0, metavar="S",
                   help="learning-rate factor of everything but the heads (T2T-ViT transfer uses 0.01)")

    g = p.add_argument_group("schedule")
    g.add_argument("--sched", default="cosine", metavar="SCHEDULER", help="timm scheduler name")
    g.add_argument("--epochs", type=int, default=300, metavar="N", help="epochs (plus --cooldown-epochs)")
    g.add_argument("--warmup-epochs", type=int, default=20, metavar="N")
    g.add_argument("--warmup-lr", type=float, default=1e-6, metavar="LR")
    g.add_argument("--min-lr", type=float, default=1e-5, metavar="LR")
    g.add_argument("--cooldown-epochs", type=int, default=10, metavar="N")
    g.add_argument("--decay-epochs", type=float, default=30, metavar="N")
    g.add_argument("--decay-rate", "--dr", type=float, default=0.1, metavar="RATE")
    g.add_argument("--patience-epochs", type=int, default=10, metavar="N")
    g.add_argument("--lr-noise", type=float, nargs="+", default=None, metavar="pct, pct")
    g.add_argument("--lr-noise-pct", type=float, default=0.67, metavar="PERCENT")
    g.add_argument("--lr-noise-std", type=float, default=1.0, metavar="STDDEV")
    g.add_argument("--lr-cycle-mul", type=float, default=1.0, metavar="MULT")
    g.add_argument("--lr-cycle-limit", type=int, default=1, metavar="N")

    g = p.add_argument_group("augmentation and regularisation")
    g.add_argument("--no-aug", action="store_true", help="no training augmentation")
    g.add_argument("--train-crop", default="rrc", choices=("rrc", "pad"),
                   help="rrc: random resized crop (ImageNet); pad: resize, pad and random crop (CIFAR transfer)")
    g.add_argument("--scale", type=float, nargs=2, default=[0.08, 1.0], metavar="PCT")
    g.add_argument("--ratio", type=float, nargs=2, default=[3. / 4., 4. / 3.], metavar="RATIO")
    g.add_argument("--hflip", type=float, default=0.5)
    g.add_argument("--vflip", type=float, default=0.)
    g.add_argument("--color-jitter", type=float, default=0.4, metavar="PCT")
    g.add_argument("--aa", default="rand-m9-mstd0.5-inc1", metavar="NAME",
                   help="timm auto-augment policy; 'none' for none")
    g.add_argument("--reprob", type=float, default=0.25, metavar="PCT", help="random erasing probability")
    g.add_argument("--remode", default="pixel", help="random erasing mode")
    g.add_argument("--recount", type=int, default=1, help="random erasing count")
    g.add_argument("--train-interpolation", default="random", help="training resize interpolation")
    g.add_argument("--repeated-aug", type=int, default=0, metavar="N",
                   help="repeated augmentation: each image N times per epoch on different ranks (DeiT: 3)")
    g.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha (0: off)")
    g.add_argument("--cutmix-minmax", type=float, nargs=2, default=None)
    g.add_argument("--mixup-prob", type=float, default=1.0)
    g.add_argument("--mixup-switch-prob", type=float, default=0.5)
    g.add_argument("--mixup-mode", default="batch", choices=("batch", "pair", "elem"))
    g.add_argument("--mixup-off-epoch", type=int, default=0, metavar="N", help="no mixup from this epoch (0: never)")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--drop", type=float, default=0.0, metavar="PCT", help="dropout")
    g.add_argument("--attn-drop", type=float, default=0.0, metavar="PCT", help="attention dropout")
    g.add_argument("--drop-path", type=float, default=0.1, metavar="PCT", help="stochastic depth")

    g = p.add_argument_group("model EMA")
    g.add_argument("--model-ema", action=argparse.BooleanOptionalAction, default=True,
                   help="track an exponential moving average of the weights")
    g.add_argument("--model-ema-decay", type=float, default=0.99996)
    g.add_argument("--model-ema-force-cpu", action="store_true", help="keep the EMA on the CPU (not evaluated)")
    g.add_argument("--model-ema-warmup", action="store_true", help="timm's EMA decay warm-up")

    g = p.add_argument_group("precision, devices and logging")
    g.add_argument("--amp", action="store_true",
                   help="torch.autocast: float16 + GradScaler on CUDA, bfloat16 on the CPU")
    g.add_argument("--native-amp", action="store_true", help="same as --amp")
    g.add_argument("--amp-dtype", default=None, choices=tuple(AMP_DTYPES), help="autocast dtype (implies --amp)")
    g.add_argument("--apex-amp", action="store_true", help="NVIDIA apex AMP (O1) instead of torch.autocast")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    g.add_argument("--dist-backend", default=None, help="process-group backend (default: nccl on CUDA, gloo on CPU)")
    g.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=None,
                   help="set by torch.distributed.launch")
    g.add_argument("--seed", type=int, default=42, metavar="S")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms (bit-exact resume on CUDA too; slower)")
    g.add_argument("--log-interval", type=int, default=50, metavar="N", help="steps between log lines")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars on rank 0 (default: when stdout is a terminal)")
    return p


def _dashed(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _coerce(action: argparse.Action, key: str, value: Any, source: str) -> Any:
    """A config value checked and converted like the flag's command-line value."""
    where = f"{source}: key '{key}'"
    if value is None:
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    many = action.nargs not in (None, "?")
    if many:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        if isinstance(action.nargs, int) and len(value) != action.nargs:
            raise ConfigError(f"{where} must list {action.nargs} values, got {len(value)}")
        values = list(value)
    else:
        if isinstance(value, (list, tuple, dict)):
            raise ConfigError(f"{where} must be a single value, got {value!r}")
        values = [value]
    convert = action.type or str
    out = []
    kind = getattr(convert, "__name__", "value")
    for v in values:
        try:
            if isinstance(v, str):
                v = convert(v)
            elif convert in (float, str) and isinstance(v, (int, float)) and not isinstance(v, bool):
                v = convert(v)
            elif not (convert is int and isinstance(v, int) and not isinstance(v, bool)):
                raise ValueError
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {v!r} is not a valid {kind}") from None
        if action.choices is not None and v not in action.choices:
            raise ConfigError(f"{where}: {v!r} is not one of {', '.join(map(str, action.choices))}")
        out.append(v)
    return out if many else out[0]


def load_config(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Defaults from a YAML file; raises ConfigError naming an unknown key or a bad value."""
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"config {path} must be a mapping of option names to values")
    actions = {a.dest: a for a in parser._actions if a.dest not in NOT_CONFIG}
    out = {}
    for key, value in cfg.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in actions:
            close = difflib.get_close_matches(dest, list(actions), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{key}' in config {path}{hint}")
        out[dest] = _coerce(actions[dest], str(key), value, f"config {path}")
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command line over config file over built-in defaults."""
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("-c", "--config", default="")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**load_config(known.config, parser))
    return parser.parse_args(argv)


def resolved_config(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings as a config file would hold them (feeds back through --config)."""
    return {k: v for k, v in vars(args).items() if k not in NOT_CONFIG}


def check_args(args: argparse.Namespace) -> None:
    """Reject settings that cannot work, before anything slow."""
    if args.data and args.data_dir and args.data != args.data_dir:
        raise ConfigError(f"two dataset folders: DIR {args.data} and --data-dir {args.data_dir}")
    args.data = args.data or args.data_dir
    args.data_dir = None
    if args.data is None:
        raise ConfigError("no dataset folder: pass DIR (or --data-dir DIR, or 'data' in the config)")
    positive = dict(batch_size=args.batch_size, img_size=args.img_size, epochs=args.epochs,
                    validation_batch_size_multiplier=args.validation_batch_size_multiplier,
                    calib_size=args.calib_size)
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"{_dashed(name)} must be at least 1, got {value}")
    if args.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {args.workers}")
    for flag in ("initial_checkpoint", "finetune", "resume"):
        others = [f for f in ("initial_checkpoint", "finetune", "resume") if f != flag and getattr(args, f)]
        if getattr(args, flag) and others:
            raise ConfigError(f"{_dashed(flag)} and {_dashed(others[0])} cannot be used together")
    if args.apex_amp and (args.amp or args.native_amp or args.amp_dtype):
        raise ConfigError("--apex-amp replaces --amp; pass one of them")
    if args.apex_amp and importlib.util.find_spec("apex") is None:
        raise ConfigError("--apex-amp needs NVIDIA apex (https://github.com/NVIDIA/apex), which is not "
                          "installed; use --amp for torch.autocast mixed precision")
    if args.opt.lower() not in list_optimizers() and args.opt.lower().split("_")[-1] not in list_optimizers():
        raise ConfigError(f"unknown --opt {args.opt!r}; timm optimizers: {', '.join(list_optimizers())}")
    if not re.fullmatch(r"loss|top1|top5|exit\d+_(loss|top1|top5)", args.eval_metric):
        raise ConfigError(f"--eval-metric {args.eval_metric!r}: use top1, top5, loss or exit{{k}}_top1/_loss")
    if _mixup_active(args) and args.batch_size % 2:
        raise ConfigError(f"mixup/cutmix needs an even --batch-size, got {args.batch_size}")
    if args.dataset in CIFAR_NUM_CLASSES and args.num_classes not in (None, CIFAR_NUM_CLASSES[args.dataset]):
        raise ConfigError(f"--dataset {args.dataset} has {CIFAR_NUM_CLASSES[args.dataset]} classes, "
                          f"but --num-classes is {args.num_classes}")


def _mixup_active(args: argparse.Namespace) -> bool:
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


# ------------------------------------------------------------------------------ setup

LOG_FORMAT = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")


def setup_logging(is_main: bool) -> list[logging.Handler]:
    """Rank 0 logs to stdout; other ranks only warnings."""
    _logger.setLevel(logging.INFO if is_main else logging.WARNING)
    _logger.propagate = False
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(LOG_FORMAT)
    _logger.addHandler(handler)
    return [handler]


def add_file_log(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(LOG_FORMAT)
    _logger.addHandler(handler)
    return handler


def remove_logging(handlers: Sequence[logging.Handler]) -> None:
    for h in handlers:
        _logger.removeHandler(h)
        h.close()


def amp_settings(args: argparse.Namespace, device: torch.device) -> tuple[Optional[torch.dtype], bool]:
    """(autocast dtype or None, whether a GradScaler is needed)."""
    if not (args.amp or args.native_amp or args.amp_dtype):
        return None, False
    dtype = AMP_DTYPES[args.amp_dtype] if args.amp_dtype else (
        torch.float16 if device.type == "cuda" else torch.bfloat16)
    if dtype == torch.float16 and device.type != "cuda":
        raise ConfigError("--amp-dtype float16 needs CUDA; on the CPU --amp uses bfloat16")
    return dtype, dtype == torch.float16


def build_datasets(args: argparse.Namespace, img_size: int, train_transform: bool = True):
    """(train set with the training transform or None, validation set, number of classes)."""
    dmean, dstd = default_mean_std(args.dataset)
    mean = tuple(args.mean) if args.mean else dmean
    std = tuple(args.std) if args.std else dstd
    cifar = args.dataset in CIFAR_NUM_CLASSES
    crop_pct = args.crop_pct if args.crop_pct is not None else (1.0 if cifar else 0.875)
    val_tf = eval_transform(img_size, crop_pct, mean, std)
    train_tf = None
    if train_transform:
        aa = None if args.aa in (None, "", "none") else args.aa
        if args.no_aug:
            train_tf = eval_transform(img_size, crop_pct, mean, std)
        elif args.train_crop == "pad":
            train_tf = cifar_train_transform(img_size, args.hflip, mean, std, aa, args.reprob, args.remode,
                                             args.recount)
        else:
            train_tf = create_transform(
                img_size, is_training=True, scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip,
                vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=aa,
                interpolation=args.train_interpolation, mean=mean, std=std, re_prob=args.reprob,
                re_mode=args.remode, re_count=args.recount)
    if cifar:
        train = load_cifar(args.dataset, args.data, True, train_tf) if train_transform else None
        val = load_cifar(args.dataset, args.data, False, val_tf)
        return train, val, CIFAR_NUM_CLASSES[args.dataset]
    for split in (args.train_split, args.val_split) if train_transform else (args.val_split,):
        split_dir(args.data, split)  # both folders exist, before the (slow) scan of either
    train = build_split(args.data, args.train_split, train_tf) if train_transform else None
    val = build_split(args.data, args.val_split, val_tf)
    return train, val, len(val.classes)


def calibration_set(args: argparse.Namespace, img_size: int):
    """A seeded random subset of the training images with training-style augmentation (as
    the original threshold search), augmented reproducibly."""
    dmean, dstd = default_mean_std(args.dataset)
    tf = calibration_transform(img_size, tuple(args.mean) if args.mean else dmean,
                               tuple(args.std) if args.std else dstd)
    if args.dataset in CIFAR_NUM_CLASSES:
        base = load_cifar(args.dataset, args.data, True, tf)
    else:
        base = build_split(args.data, args.train_split, tf)
    return SeededDataset(seeded_subset(base, args.calib_size, args.seed), args.seed, STREAM_CALIB_SAMPLES)


def create_dvt(args: argparse.Namespace, num_classes: int, **overrides: Any) -> nn.Module:
    """The model named by --model (any model registered in timm)."""
    kwargs = dict(num_classes=num_classes, img_size=args.img_size, drop_rate=args.drop,
                  attn_drop_rate=args.attn_drop, drop_path_rate=args.drop_path,
                  feature_reuse=args.feature_reuse, relation_reuse=args.relation_reuse)
    kwargs.update(overrides)
    if not (args.model.startswith("DVT") and timm.is_model(args.model)):
        raise ConfigError(f"unknown model {args.model!r}; DVT models: {', '.join(timm.list_models('DVT*'))}")
    return timm.create_model(args.model, **kwargs)


def load_start_weights(model: nn.Module, args: argparse.Namespace, num_classes: int) -> nn.Module:
    """--initial-checkpoint (same heads) or --finetune (new heads when the classes differ)."""
    path = args.initial_checkpoint or args.finetune
    # as timm: an initial checkpoint gives its model weights; fine-tuning starts from the EMA
    # weights when there are some (as T2T-ViT's transfer script)
    weights, which = checkpoint_weights(load_checkpoint_file(path), "auto" if args.finetune else "model", path)
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


def run_folder(args: argparse.Namespace, env: DistEnv) -> Path:
    """OUTPUT/train/EXPERIMENT, or the resumed checkpoint's folder; the same on every rank."""
    if args.experiment:
        folder = Path(args.output) / "train" / args.experiment
    elif args.resume:
        folder = Path(args.resume).resolve().parent
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        folder = Path(args.output) / "train" / f"{stamp}-{args.model}-{args.img_size}"
    folder = Path(broadcast_object(str(folder)))
    if args.auto_resume and not args.resume and (folder / LAST).is_file():
        args.resume = str(folder / LAST)
    if not args.resume and (folder / LAST).is_file():
        raise ConfigError(f"{folder} already holds a run ({LAST}); resume it with --resume {folder / LAST} "
                          "or --auto-resume, or choose another --experiment")
    return folder


class CsvSummary:
    """summary.csv: one row per epoch; the columns are fixed by the first row written."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, row: dict[str, Any]) -> None:
        new = not self.path.is_file()
        fields = list(row)
        if not new:
            with open(self.path, newline="") as f:
                fields = next(csv.reader(f), fields)
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}{k}": v for k, v in metrics.items() if k not in ("samples", "img_per_s", "lr", "top1", "top5")}


# -------------------------------------------------------------------------------- run

def model_for_checkpoint(args: argparse.Namespace, checkpoint: dict, weights: dict, device: torch.device) -> nn.Module:
    """The checkpoint's own model when it names one (ours and our released files do), else
    --model with heads sized from the weights; the weights loaded, on ``device``."""
    if checkpoint.get("model_name"):
        model = model_from_checkpoint(checkpoint)
    else:
        model = create_dvt(args, head_classes(weights) or 1000)
    load_weights(model, weights)
    return model.to(device)


def export_only(args: argparse.Namespace, env: DistEnv) -> None:
    """--export-released CKPT: the released file of any checkpoint."""
    path = Path(args.export_released)
    checkpoint = load_checkpoint_file(path)
    weights, which = checkpoint_weights(checkpoint, args.release_weights, str(path))
    out = Path(args.released_path) if args.released_path else path.with_name(RELEASED)
    if out.resolve() == path.resolve():
        raise ConfigError(f"--export-released would overwrite {path}; pass --released-path")
    model = model_for_checkpoint(args, checkpoint, weights, env.device)
    _, val_set, _ = build_datasets(args, model.img_size, train_transform=False)
    export_released(model, val_set, calibration_set(args, model.img_size), env, out,
                    args.batch_size * args.validation_batch_size_multiplier, args.workers, _progress(args, env),
                    extra={"source_checkpoint": str(path), "weights": which})
    _logger.info(f"wrote {out}")


def eval_only(args: argparse.Namespace, env: DistEnv) -> None:
    """--eval-checkpoint CKPT: per-exit loss and top-1 on the validation set."""
    checkpoint = load_checkpoint_file(args.eval_checkpoint)
    weights, which = checkpoint_weights(checkpoint, args.release_weights, args.eval_checkpoint)
    model = model_for_checkpoint(args, checkpoint, weights, env.device)
    _, val_set, _ = build_datasets(args, model.img_size, train_transform=False)
    amp_dtype, _ = amp_settings(args, env.device)
    loader = make_loader(val_set, ShardSampler(len(val_set), env.world_size, env.rank),
                         args.batch_size * args.validation_batch_size_multiplier, args.workers, env)
    m = evaluate(model, loader, env, amp_dtype, _progress(args, env))
    _logger.info(f"{args.eval_checkpoint} ({which} weights): {format_metrics(m, model.num_exits)}")


def _progress(args: argparse.Namespace, env: DistEnv) -> bool:
    shown = sys.stdout.isatty() if args.progress is None else args.progress
    return bool(shown and env.is_main)


def train(args: argparse.Namespace, env: DistEnv, stop: StopSignal) -> None:
    """The training run, logged to ``log.txt`` in the run folder as well."""
    folder = run_folder(args, env)
    file_log = None
    if env.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        file_log = add_file_log(folder / "log.txt")
    try:
        _train(args, env, stop, folder)
    finally:
        if file_log is not None:
            remove_logging([file_log])


def _train(args: argparse.Namespace, env: DistEnv, stop: StopSignal, folder: Path) -> None:
    """Build, resume, train and evaluate every epoch, checkpoint, release."""
    config = resolved_config(args)
    if env.is_main:
        with open(folder / CONFIG_FILE, "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)

    # Data.
    train_base, val_set, num_classes = build_datasets(args, args.img_size)
    if args.num_classes is not None:
        if args.num_classes < num_classes:
            raise ConfigError(f"--num-classes {args.num_classes} is smaller than the {num_classes} classes of the data")
        num_classes = args.num_classes
    train_set = SeededDataset(train_base, args.seed, STREAM_TRAIN_SAMPLES)
    sampler = EpochSampler(len(train_set), env.world_size, env.rank, args.seed, repeats=args.repeated_aug)
    steps_per_epoch = sampler.per_rank // args.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(f"the training set ({len(train_set)} images) has less than one batch per process "
                          f"(--batch-size {args.batch_size} x {env.world_size} processes)")
    train_loader = make_loader(train_set, sampler, args.batch_size, args.workers, env, drop_last=True,
                               pin_memory=args.pin_mem)
    val_loader = make_loader(val_set, ShardSampler(len(val_set), env.world_size, env.rank),
                             args.batch_size * args.validation_batch_size_multiplier, args.workers, env,
                             pin_memory=args.pin_mem)

    # Model: the same initial weights on every rank (so is the EMA).
    seed_all(args.seed)
    model = create_dvt(args, num_classes)
    if args.initial_checkpoint or args.finetune:
        model = load_start_weights(model, args, num_classes)
    num_exits = model.num_exits
    metric_names = {"loss", "top1", "top5", f"exit{num_exits}_top5"} | {
        f"exit{k}_{m}" for k in range(1, num_exits + 1) for m in ("top1", "loss")}
    if args.eval_metric not in metric_names:
        raise ConfigError(f"--eval-metric {args.eval_metric!r}: {args.model} has {num_exits} exits; "
                          f"choose one of {', '.join(sorted(metric_names))}")
    model.to(env.device)

    amp_dtype, needs_scaler = amp_settings(args, env.device)
    lr = args.lr
    if args.lr_base is not None:
        lr = args.lr_base * args.batch_size * env.world_size / args.lr_base_size
    opt_kwargs: dict[str, Any] = {}
    if args.opt_eps is not None:
        opt_kwargs["eps"] = args.opt_eps
    if args.opt_betas is not None:
        opt_kwargs["betas"] = tuple(args.opt_betas)
    optimizer = create_optimizer_v2(param_groups(model, args.weight_decay, args.backbone_lr_scale), opt=args.opt,
                                    lr=lr, weight_decay=args.weight_decay, momentum=args.momentum, **opt_kwargs)
    loss_scaler = None
    if args.apex_amp:
        from apex import amp as apex_amp  # optional dependency, checked by check_args

        if env.device.type != "cuda":
            raise ConfigError("--apex-amp needs CUDA")
        model, optimizer = apex_amp.initialize(model, optimizer, opt_level="O1")
        loss_scaler = ApexScaler()
    elif needs_scaler:
        loss_scaler = NativeScaler(device=env.device.type)
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                               device=torch.device("cpu") if args.model_ema_force_cpu else None)
    try:
        lr_scheduler, num_epochs = create_scheduler_v2(
            optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
            cooldown_epochs=args.cooldown_epochs, patience_epochs=args.patience_epochs, decay_rate=args.decay_rate,
            min_lr=args.min_lr, warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, noise=args.lr_noise,
            noise_pct=args.lr_noise_pct, noise_std=args.lr_noise_std, noise_seed=args.seed,
            cycle_mul=args.lr_cycle_mul, cycle_limit=args.lr_cycle_limit,
            plateau_mode="min" if args.eval_metric.endswith("loss") else "max",
            step_on_epochs=True, updates_per_epoch=steps_per_epoch)
    except ValueError as e:
        raise ConfigError(f"--sched {args.sched}: {e}") from None

    # Resume.
    start_epoch, start_step, num_updates = 0, 0, 0
    best_metric: Optional[float] = None
    best_epoch: Optional[int] = None
    meter_state = None
    if args.resume:
        checkpoint = load_checkpoint_file(args.resume)
        if not is_training_checkpoint(checkpoint):
            raise ConfigError(f"--resume {args.resume}: not a training checkpoint of main.py (last.pth.tar or "
                              "best.pth.tar); to start from weights only use --initial-checkpoint or --finetune")
        load_weights(model, checkpoint["model"])
        if model_ema is not None:
            ema_weights, _ = checkpoint_weights(checkpoint, "ema" if checkpoint.get("model_ema") else "model")
            model_ema.module.load_state_dict(ema_weights)
        if not args.no_resume_opt:
            optimizer.load_state_dict(checkpoint["optimizer"])
            if loss_scaler is not None and checkpoint.get("scaler") is not None:
                loss_scaler.load_state_dict(checkpoint["scaler"])
            if lr_scheduler is not None and checkpoint.get("scheduler") is not None:
                lr_scheduler.load_state_dict(checkpoint["scheduler"])
        start_epoch, start_step = int(checkpoint["epoch"]), int(checkpoint["step"])
        num_updates = int(checkpoint["num_updates"])
        best_metric, best_epoch = checkpoint.get("best_metric"), checkpoint.get("best_epoch")
        per_rank = checkpoint.get("per_rank") or []
        if len(per_rank) == env.world_size:
            restore_rng_state(per_rank[env.rank]["rng"])
            meter_state = per_rank[env.rank].get("meter")
        else:
            _logger.warning(f"the checkpoint was written by {len(per_rank)} processes, this run has "
                            f"{env.world_size}: the run continues, but not exactly as it would have")
        changed = [k for k in ("model", "batch_size", "seed", "img_size", "dataset", "mixup", "cutmix", "lr")
                   if checkpoint.get("config", {}).get(k, config[k]) != config[k]]
        if changed:
            _logger.warning(f"resuming with settings that differ from the checkpoint's: {', '.join(changed)}")
        _logger.info(f"resumed {args.resume}: epoch {start_epoch}, step {start_step}, {num_updates} updates")
    if args.start_epoch is not None:
        start_epoch, start_step = args.start_epoch, 0

    if env.distributed:
        model = DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    plain = model.module if env.distributed else model

    mixup_fn = None
    if _mixup_active(args):
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=num_classes)
        loss_fn: nn.Module = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        loss_fn = nn.CrossEntropyLoss()

    n_params = sum(p.numel() for p in plain.parameters())
    _logger.info(
        f"{args.model}: {n_params / 1e6:.2f}M parameters, {num_exits} exits, {num_classes} classes, "
        f"{args.img_size}px | {env.world_size} process(es) on {env.device.type}"
        f"{' (' + env.backend + ')' if env.backend else ''} | batch {args.batch_size} x {env.world_size}, "
        f"lr {lr:.3g}, {args.opt}, epochs {num_epochs} | precision "
        f"{'apex O1' if args.apex_amp else amp_dtype or 'float32'} | EMA {'on' if model_ema else 'off'} | "
        f"{len(train_set)} training / {len(val_set)} validation images | run folder {folder}")

    def build(epoch: int, step: int, updates: int, metrics: Optional[dict] = None):
        return lambda per_rank: training_checkpoint(
            model, optimizer, epoch, step, updates, config, per_rank, model_ema, loss_scaler, lr_scheduler,
            best_metric, best_epoch, metrics)

    def save_recovery(step: int, updates: int, meter: ExitMeter) -> None:
        save_training_state(folder / LAST, build(epoch, step, updates), env, meter)

    ctx = TrainContext(
        optimizer=optimizer, loss_fn=loss_fn, env=env, seed=args.seed, amp_dtype=amp_dtype,
        loss_scaler=loss_scaler, clip_grad=args.clip_grad, clip_mode=args.clip_mode, model_ema=model_ema,
        ema_warmup=args.model_ema_warmup, mixup_fn=mixup_fn, lr_scheduler=lr_scheduler,
        log_interval=args.log_interval, progress=_progress(args, env), stop=stop,
        recovery_interval=args.recovery_interval, save_recovery=save_recovery)
    summary = CsvSummary(folder / "summary.csv")
    evaluate_ema = model_ema is not None and not args.model_ema_force_cpu
    decreasing = args.eval_metric.endswith("loss")

    for epoch in range(start_epoch, num_epochs):
        started = time.time()
        if mixup_fn is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
            mixup_fn.mixup_enabled = False
        if lr_scheduler is not None and args.sched != "plateau":
            lr_scheduler.step(epoch)  # a pure function of the epoch: also right after a resume
        sampler.set_epoch(epoch, start_step * args.batch_size)
        meter = None
        if start_step and meter_state is not None:
            meter = ExitMeter(num_exits, env.device)
            meter.load_state_dict(meter_state)
        result = train_one_epoch(model, train_loader, ctx, epoch, num_updates, start_step, meter)
        num_updates = result.num_updates
        if result.interrupted:
            save_training_state(folder / LAST, build(epoch, result.steps_done, num_updates), env, result.meter)
            raise TrainingInterrupted(stop.signum, folder / LAST)
        start_step, meter_state = 0, None

        eval_metrics = evaluate(plain, val_loader, env, amp_dtype, ctx.progress)
        _logger.info(f"val {epoch}: {format_metrics(eval_metrics, num_exits)}")
        score_metrics = eval_metrics
        row = {"epoch": epoch, "lr": result.metrics["lr"], **_prefixed("train_", result.metrics),
               "train_img_per_s": result.images_per_second, **_prefixed("eval_", eval_metrics)}
        if evaluate_ema:
            ema_metrics = evaluate(model_ema.module, val_loader, env, amp_dtype, ctx.progress, "val (EMA)")
            _logger.info(f"val {epoch} (EMA): {format_metrics(ema_metrics, num_exits)}")
            row.update(_prefixed("ema_eval_", ema_metrics))
            score_metrics = ema_metrics
        score = score_metrics[args.eval_metric]
        if lr_scheduler is not None:
            lr_scheduler.step(epoch + 1, score)
        is_best = best_metric is None or (score < best_metric if decreasing else score > best_metric)
        if is_best:
            best_metric, best_epoch = score, epoch
        row["epoch_time_s"] = time.time() - started
        if env.is_main:
            summary.write(row)
        save_training_state(folder / LAST, build(epoch + 1, 0, num_updates, score_metrics), env,
                            also=[folder / BEST] if is_best else [])
        _logger.info(f"epoch {epoch}: {args.eval_metric} {score:.4f} (best {best_metric:.4f} at epoch {best_epoch}), "
                     f"{result.images_per_second:.1f} img/s training, saved {folder / LAST}")
        if agreed_flags(env, stop.requested)[0]:
            raise TrainingInterrupted(stop.signum or 15, folder / LAST)

    if best_epoch is not None:
        _logger.info(f"best {args.eval_metric}: {best_metric:.4f} (epoch {best_epoch})")
    if args.release and (folder / BEST).is_file():
        which = args.release_weights
        if which == "auto":
            which = "ema" if evaluate_ema else "model"
        weights, _ = checkpoint_weights(load_checkpoint_file(folder / BEST), which, str(folder / BEST))
        load_weights(plain, weights)
        export_released(plain, val_set, calibration_set(args, args.img_size), env, folder / RELEASED,
                        args.batch_size * args.validation_batch_size_multiplier, args.workers, ctx.progress,
                        extra={"weights": which, "best_epoch": best_epoch, "config": config})
        _logger.info(f"wrote {folder / RELEASED} ({which} weights of epoch {best_epoch})")


def _one_line(error: BaseException) -> str:
    """The message of an error; for errors raised in DataLoader workers, the worker's last line."""
    text = str(error).strip()
    if "Traceback (most recent call last)" in text:
        text = [line for line in text.splitlines() if line.strip()][-1].strip()
    return text.splitlines()[0] if text else type(error).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command with ``argv`` (default ``sys.argv[1:]``); returns the exit status:
    0 done; 1 a data, checkpoint or non-finite-loss error; 2 bad options or config (one line on
    stderr each); 128 + signal number when a signal stopped the run after it saved a resumable
    checkpoint."""
    rank = int(os.environ.get("RANK", "0"))
    try:
        args = parse_args(argv)
        check_args(args)
    except SystemExit as e:
        return int(e.code or 0)
    except ConfigError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    handlers = setup_logging(rank == 0)
    env = None
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        if args.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        else:
            torch.backends.cudnn.benchmark = True
        env = setup_distributed(args.device, args.dist_backend, args.local_rank)
        if args.export_released:
            export_only(args, env)
        elif args.eval_checkpoint:
            eval_only(args, env)
        else:
            with StopSignal(escalate=not env.distributed) as stop:
                train(args, env, stop)
        return 0
    except TrainingInterrupted as e:
        _logger.warning(f"{e}; resume with: --resume {e.path}")
        return 128 + e.signum
    except (ConfigError, CheckpointError, DataError, NonFiniteLossError) as e:
        shared = isinstance(e, (ConfigError, NonFiniteLossError))  # every rank raises the same one
        if rank == 0 or not shared:
            prefix = f"rank {rank}: " if env is not None and env.distributed and not shared else ""
            extra = " The last good checkpoint is left as it was." if isinstance(e, NonFiniteLossError) else ""
            print(f"error: {prefix}{_one_line(e)}{extra}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        cleanup_distributed()
        remove_logging(handlers)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])


if __name__ == "__main__":
    sys.exit(main())

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
import ast
import copy
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
from typing import Any, NamedTuple, Optional, Sequence

import timm
import torch
import torch.nn as nn
import yaml
from timm.data import create_transform
from timm.optim import list_optimizers
from timm.utils import ApexScaler, NativeScaler
from torch.nn.parallel import DistributedDataParallel

import models  # noqa: F401  (registers the DVT models in timm)
from models.factory import create_cascade, is_cascade_name, is_single_exit
from models.registry import MODEL_CFGS
from utils.checkpoint.files import load_checkpoint_file
from utils.checkpoint.release import export_released
from utils.checkpoint.training import (
    ResumePoint,
    check_not_rewinding,
    check_resumable,
    restore_training_state,
    save_training_state,
    state_layout,
    training_checkpoint,
)
from utils.checkpoint.weights import (
    build_from_checkpoint,
    checkpoint_weights,
    head_classes,
    is_training_checkpoint,
    load_weights,
    unwrap_model,
)
from utils.data.cifar import CIFAR_NUM_CLASSES, cifar_train_transform, load_cifar
from utils.data.classes import check_checkpoint_classes, check_split_classes, few_classes_warning
from utils.data.folders import build_split, split_dir
from utils.data.images import BAD_IMAGE_POLICIES, BadImageCounter, SkipBadImages, loader_collate
from utils.data.loader import (
    CALIB_SEED,
    EpochSampler,
    SeededDataset,
    ShardSampler,
    calibration_subset,
    close_loaders,
    make_loader,
)
from utils.data.scan import list_classes
from utils.data.shards import TarImageFolder, tar_split
from utils.data.transforms import (
    DeviceNormalize,
    calibration_transform,
    default_mean_std,
    eval_transform,
    guard_posterize,
)
from utils.errors import CheckpointError, ConfigError, DataError, one_line
from utils.precision import resolve_precision
from utils.run.config import safe_load_unique
from utils.run.distributed import (
    DistEnv,
    agreed_flags,
    broadcast_object,
    cleanup_distributed,
    derived_experiment,
    on_rank_zero,
    setup_distributed,
    under_elastic_launcher,
)
from utils.run.folder import RunLock, RunLockedError, create_unique_folder
from utils.run.preflight import (
    check_finite_options,
    check_image_sizes,
    check_output_folder,
    check_writable_file,
    checkpoint_bytes,
)
from utils.run.signals import Interrupted, StopSignal, signals_raise
from utils.train.guard import NonFiniteLossError, StepGuard, parse_injections
from utils.train.loop import (
    EpochResult,
    ExitMeter,
    TrainContext,
    TrainingInterrupted,
    evaluate,
    format_metrics,
    train_one_epoch,
)
from utils.train.recipe import (
    build_ema,
    build_mixup_and_loss,
    build_optimizer,
    build_scheduler,
    init_head_,
    mixup_active,
    scaled_lr,
)
from utils.train.rng import STREAM_TRAIN_SAMPLES, deterministic_mode, seed_all

_logger = logging.getLogger("dvt.train")

AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
DATASETS = ("imagenet", "folder", "cifar10", "cifar100")
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
    _add_data_args(p)
    _add_checkpoint_args(p)
    _add_optimizer_args(p)
    _add_schedule_args(p)
    _add_augmentation_args(p)
    _add_ema_args(p)
    _add_runtime_args(p)
    return p


def _add_data_args(p: argparse.ArgumentParser) -> None:
    """Options: data and model."""
    g = p.add_argument_group("data and model")
    g.add_argument("data", nargs="?", default=None, metavar="DIR",
                   help="dataset folder: train/ and val/ ImageFolders, or the CIFAR folder with --dataset cifar*")
    g.add_argument("--data-dir", default=None, metavar="DIR", help="same as the positional DIR")
    g.add_argument("--dataset", default="imagenet", choices=DATASETS,
                   help="imagenet/folder: DIR/train and DIR/val ImageFolders; cifar10/cifar100: torchvision's format")
    g.add_argument("--train-split", default="train", help="training folder inside DIR")
    g.add_argument("--val-split", default="val", help="validation folder inside DIR")
    g.add_argument("--model", default="DVT_T2t_vit_12", metavar="MODEL",
                   help="DVT model, or any timm classifier trained as a single-exit baseline (deit_small_patch16_224, ...)")
    g.add_argument("--model-kwargs", nargs="*", default={}, action=ModelKwargs, metavar="KEY=VALUE",
                   help="more constructor arguments of the model (timm's convention), e.g. depth=6 patch_size=8")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute every block in the backward pass: less activation memory, slower steps")
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
    g.add_argument("--bad-images", default="error", choices=BAD_IMAGE_POLICIES,
                   help="an unreadable image: error stops the run naming the file; skip replaces the sample by "
                        "another of its batch, logs the file and counts it")
    g.add_argument("--bad-images-max-fraction", type=float, default=0.001, metavar="F",
                   help="with --bad-images skip: stop when more than this share of an epoch's images failed")


def _add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    """Options: checkpoints."""
    g = p.add_argument_group("checkpoints")
    g.add_argument("--initial-checkpoint", default="", metavar="PATH",
                   help="start from these weights (same classes; released layout or ours)")
    g.add_argument("--finetune", default="", metavar="PATH",
                   help="start from these weights with new heads for the dataset's classes (transfer learning)")
    g.add_argument("--resume", default="", metavar="PATH", help="continue a run exactly from its last.pth.tar")
    g.add_argument("--auto-resume", action=argparse.BooleanOptionalAction, default=None,
                   help="resume from the run folder's last.pth.tar when there is one; None: on under torchrun "
                        "(whose restarts and re-launches then continue the run), off otherwise")
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
    g.add_argument("--calib-seed", type=int, default=CALIB_SEED, metavar="S",
                   help="seed of the calibration images and their augmentation (the default of inference.py "
                        "--seed too: the same weights get the same thresholds from both)")
    g.add_argument("--eval-checkpoint", "--eval_checkpoint", default="", metavar="PATH",
                   help="only evaluate the per-exit accuracy of this checkpoint on the validation set")


def _add_optimizer_args(p: argparse.ArgumentParser) -> None:
    """Options: optimizer."""
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
    g.add_argument("--layer-decay", type=float, default=None, metavar="D",
                   help="layer-wise learning-rate decay (timm): block i of L gets D^(L-i), the embeddings "
                        "D^(L+1), the heads 1; in a cascade depth counts within each stage")


def _add_schedule_args(p: argparse.ArgumentParser) -> None:
    """Options: schedule."""
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


def _add_augmentation_args(p: argparse.ArgumentParser) -> None:
    """Options: augmentation and regularisation."""
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


def _add_ema_args(p: argparse.ArgumentParser) -> None:
    """Options: model EMA."""
    g = p.add_argument_group("model EMA")
    g.add_argument("--model-ema", action=argparse.BooleanOptionalAction, default=True,
                   help="track an exponential moving average of the weights")
    g.add_argument("--model-ema-decay", type=float, default=0.99996)
    g.add_argument("--model-ema-force-cpu", action="store_true", help="keep the EMA on the CPU (not evaluated)")
    g.add_argument("--model-ema-warmup", action="store_true", help="timm's EMA decay warm-up")


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    """Options: precision, devices and logging."""
    g = p.add_argument_group("precision, devices and logging")
    g.add_argument("--amp", action="store_true",
                   help="torch.autocast: float16 + GradScaler on CUDA; bfloat16 on a CPU with native bfloat16, "
                        "else float32 with a warning")
    g.add_argument("--native-amp", action="store_true", help="same as --amp")
    g.add_argument("--amp-dtype", default=None, choices=tuple(AMP_DTYPES), help="autocast dtype (implies --amp)")
    g.add_argument("--apex-amp", action="store_true", help="NVIDIA apex AMP (O1) instead of torch.autocast")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    g.add_argument("--dist-backend", default=None, help="process-group backend (default: nccl on CUDA, gloo on CPU)")
    g.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=None,
                   help="set by torch.distributed.launch")
    g.add_argument("--seed", type=int, default=42, metavar="S")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model in place (one graph for every batch size; the EMA copy and the "
                        "checkpoints are unchanged); the first steps take longer while it compiles")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels, for bit-exact resume (slower): torch's deterministic algorithms "
                        "(an operation without one stops the run with an error), deterministic cuDNN and cuBLAS "
                        "(CUBLAS_WORKSPACE_CONFIG=:4096:8), attention on the math kernel only")
    g.add_argument("--log-interval", type=int, default=50, metavar="N",
                   help="steps between log lines (and between reads of the stop flag and skip counters)")
    g.add_argument("--max-bad-steps", type=int, default=10, metavar="K",
                   help="stop after K training steps in a row with a non-finite loss (each is skipped; 0: never stop)")
    g.add_argument("--inject-nonfinite", nargs="*", default=[], metavar="EPOCH:STEP[@RANK]",
                   help="debugging: make the loss of these steps NaN (on every rank, or on RANK)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars on rank 0 (default: when stdout is a terminal)")


class ModelKwargs(argparse.Action):
    """``KEY=VALUE ...`` -> dict; values are Python literals where they parse, else strings."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        kwargs = {}
        for item in values:
            key, sep, value = item.partition("=")
            if not sep or not key.isidentifier():
                raise argparse.ArgumentError(self, f"expected KEY=VALUE, got {item!r}")
            try:
                kwargs[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                kwargs[key] = value
        setattr(namespace, self.dest, kwargs)


def _dashed(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _coerce(action: argparse.Action, key: str, value: Any, source: str) -> Any:
    """A config value checked and converted like the flag's command-line value."""
    where = f"{source}: key '{key}'"
    if value is None:
        return None
    if isinstance(action, ModelKwargs):
        if not (isinstance(value, dict) and all(isinstance(k, str) and k.isidentifier() for k in value)):
            raise ConfigError(f"{where} must be a mapping of argument names to values, got {value!r}")
        return dict(value)
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
            cfg = safe_load_unique(f)
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
    if mixup_active(args) and args.batch_size % 2:
        raise ConfigError(f"mixup/cutmix needs an even --batch-size, got {args.batch_size}")
    if not is_cascade_name(args.model):
        raise ConfigError(f"unknown model {args.model!r}: neither a DVT model ({', '.join(timm.list_models('DVT*'))}) "
                          "nor a timm model")
    if not (args.feature_reuse and args.relation_reuse) and is_single_exit(args.model):
        raise ConfigError(f"--model {args.model} is a single-exit model: --no-feature-reuse and "
                          "--no-relation-reuse only apply to DVT models")
    if args.layer_decay is not None and not 0 < args.layer_decay <= 1:
        raise ConfigError(f"--layer-decay must be in (0, 1], got {args.layer_decay}")
    if args.layer_decay is not None and args.backbone_lr_scale != 1.0:
        raise ConfigError("--layer-decay and --backbone-lr-scale both set the learning rate of the lower layers; "
                          "pass one of them")
    if args.dataset in CIFAR_NUM_CLASSES and args.num_classes not in (None, CIFAR_NUM_CLASSES[args.dataset]):
        raise ConfigError(f"--dataset {args.dataset} has {CIFAR_NUM_CLASSES[args.dataset]} classes, "
                          f"but --num-classes is {args.num_classes}")
    if args.max_bad_steps < 0:
        raise ConfigError(f"--max-bad-steps must be >= 0 (0: never stop), got {args.max_bad_steps}")
    if not 0 <= args.bad_images_max_fraction <= 1:
        raise ConfigError(f"--bad-images-max-fraction must be between 0 and 1, got {args.bad_images_max_fraction}")
    parse_injections(args.inject_nonfinite)
    check_finite_options(vars(args))


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
    """(autocast dtype or None, whether a GradScaler is needed), by the rule of utils.precision."""
    requested = args.amp_dtype or ("auto" if args.amp or args.native_amp else None)
    try:
        precision = resolve_precision(requested, device)
    except ValueError as e:
        raise ConfigError(f"--amp: {e}") from None
    if precision.warning:
        _logger.warning(f"warning: {precision.warning}")
    return precision.dtype, precision.needs_scaler


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
                re_mode=args.remode, re_count=args.recount, use_prefetcher=device_normalize(args) is not None)
    train_tf = guard_posterize(train_tf)  # RandAugment's 0-bit posterize, on every Pillow
    if cifar:
        train = load_cifar(args.dataset, args.data, True, train_tf) if train_transform else None
        val = load_cifar(args.dataset, args.data, False, val_tf)
        return train, val, CIFAR_NUM_CLASSES[args.dataset]
    for split in (args.train_split, args.val_split) if train_transform else (args.val_split,):
        if tar_split(args.data, split) is None:
            split_dir(args.data, split)  # both folders exist, before the (slow) scan of either
    train = on_rank_zero(lambda: read_split(args.data, args.train_split, train_tf)) if train_transform else None
    val = on_rank_zero(lambda: read_split(args.data, args.val_split, val_tf))
    return train, val, len(val.classes)


def device_normalize(args: argparse.Namespace) -> Optional[DeviceNormalize]:
    """With timm's ImageNet training transform the loaders send uint8 images (no normalisation,
    no random erasing: both run on the device, see utils.data.transforms.DeviceNormalize); None for
    the other training transforms, which send normalised float32."""
    if args.no_aug or args.train_crop != "rrc":
        return None
    dmean, dstd = default_mean_std(args.dataset)
    return DeviceNormalize(tuple(args.mean) if args.mean else dmean, tuple(args.std) if args.std else dstd,
                           args.reprob, args.remode, args.recount)


def read_split(root: str, split: str, transform: Any) -> Any:
    """``root/split`` as an ImageFolder, or as tar shards (``split/*.tar`` or ``split.tar``)."""
    shards = tar_split(root, split)
    return TarImageFolder(shards, transform) if shards is not None else build_split(root, split, transform)


def calibration_set(args: argparse.Namespace, img_size: int, scanned: Any = None):
    """A seeded random subset of the training images with training-style augmentation (as
    the original threshold search), augmented reproducibly. ``scanned``: the training split
    already listed (its file list is reused, not scanned again)."""
    dmean, dstd = default_mean_std(args.dataset)
    tf = calibration_transform(img_size, tuple(args.mean) if args.mean else dmean,
                               tuple(args.std) if args.std else dstd)
    if scanned is not None:
        base = copy.copy(scanned)
        base.transform = tf
    elif args.dataset in CIFAR_NUM_CLASSES:
        base = load_cifar(args.dataset, args.data, True, tf)
    else:
        base = on_rank_zero(lambda: read_split(args.data, args.train_split, tf))
    if args.bad_images == "skip":
        base = SkipBadImages(base, substitute=True)
    return calibration_subset(base, args.calib_size, args.calib_seed)


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
    """OUTPUT/train/EXPERIMENT, or the resumed checkpoint's folder, or under torchrun one named
    after the run's settings (found again by restarts and re-launches), else a timestamped one;
    the same on every rank. Under torchrun an existing run there is resumed (--auto-resume)."""
    derived = derived_experiment(resolved_config(args), args.model, args.img_size)
    if args.experiment:
        folder = Path(args.output) / "train" / args.experiment
    elif args.resume:
        folder = Path(args.resume).resolve().parent
    elif derived:
        folder = Path(args.output) / "train" / derived
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        folder = Path(args.output) / "train" / f"{stamp}-{args.model}-{args.img_size}"
    folder = Path(broadcast_object(str(folder)))
    auto_resume = under_elastic_launcher() if args.auto_resume is None else args.auto_resume
    if auto_resume and not args.resume and (folder / LAST).is_file():
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

def model_for_checkpoint(args: argparse.Namespace, checkpoint: dict, source: str,
                         device: torch.device) -> tuple[nn.Module, str]:
    """The checkpoint's model (its own when it names one, else --model built from the
    options) with the weights --release-weights picks, on ``device``; and which weights."""
    model, which = build_from_checkpoint(
        checkpoint, source, default_name=args.model, weights=args.release_weights,
        defaults=dict(img_size=args.img_size, feature_reuse=args.feature_reuse, relation_reuse=args.relation_reuse))
    return model.to(device), which


def export_only(args: argparse.Namespace, env: DistEnv) -> None:
    """--export-released CKPT: the released file of any checkpoint."""
    path = Path(args.export_released)
    checkpoint = load_checkpoint_file(path)
    out = Path(args.released_path) if args.released_path else path.with_name(RELEASED)
    if out.resolve() == path.resolve():
        raise ConfigError(f"--export-released would overwrite {path}; pass --released-path")
    check_writable_file(out, "--released-path")
    model, which = model_for_checkpoint(args, checkpoint, str(path), env.device)
    _, val_set, _ = build_datasets(args, model.img_size, train_transform=False)
    names = _check_dataset_classes(checkpoint, model, val_set, str(path))
    names = checkpoint.get("class_names") or (names if len(names) == model.num_classes else None)
    export_released(model, val_set, calibration_set(args, model.img_size), env, out,
                    args.batch_size * args.validation_batch_size_multiplier, args.workers, _progress(args, env),
                    extra={"source_checkpoint": str(path), "weights": which, "class_names": names})
    _logger.info(f"wrote {out}")


def _check_dataset_classes(checkpoint: dict, model, val_set, source: str) -> list[str]:
    """The validation set's classes are the checkpoint's (by name when it stores them), or
    stop before any work; returns the dataset's class names (empty when it has none)."""
    names = list(getattr(val_set, "classes", None) or [])
    if names:
        check_checkpoint_classes(checkpoint.get("class_names"), model.num_classes, names, source,
                                 flag="a dataset with the checkpoint's classes")
    return names


def eval_only(args: argparse.Namespace, env: DistEnv) -> None:
    """--eval-checkpoint CKPT: per-exit loss and top-1 on the validation set."""
    checkpoint = load_checkpoint_file(args.eval_checkpoint)
    model, which = model_for_checkpoint(args, checkpoint, args.eval_checkpoint, env.device)
    _, val_set, _ = build_datasets(args, model.img_size, train_transform=False)
    _check_dataset_classes(checkpoint, model, val_set, args.eval_checkpoint)
    amp_dtype, _ = amp_settings(args, env.device)
    loader = make_loader(val_set, ShardSampler(len(val_set), env.world_size, env.rank),
                         args.batch_size * args.validation_batch_size_multiplier, args.workers, env)
    m = evaluate(model, loader, env, amp_dtype, _progress(args, env))
    _logger.info(f"{args.eval_checkpoint} ({which} weights): {format_metrics(m, model.num_exits)}")


def _progress(args: argparse.Namespace, env: DistEnv) -> bool:
    shown = sys.stdout.isatty() if args.progress is None else args.progress
    return bool(shown and env.is_main)


class PreChecked(NamedTuple):
    """What the checks before a run found: the dataset's class names (None where only the
    loaded dataset knows them) and the --resume checkpoint, already read."""
    class_names: Optional[list[str]]
    resume_checkpoint: Optional[dict]


def estimated_checkpoint_bytes(args: argparse.Namespace, num_classes: int) -> int:
    """Size of one training checkpoint of --model (weights, AdamW moments, EMA), from a model
    built on the meta device (no memory, no initialisation)."""
    with torch.device("meta"):
        model = create_dvt(args, num_classes)
    return checkpoint_bytes(model, copies=3 + int(args.model_ema))


def check_before_run(args: argparse.Namespace, folder: Path) -> PreChecked:
    """Everything that can be checked before the run writes anything or lists its images: the
    class folders of train and val, the --resume checkpoint, the output folder and its space."""
    class_names = None
    tars = any(tar_split(args.data, split) is not None for split in (args.train_split, args.val_split))
    if args.dataset not in CIFAR_NUM_CLASSES and not tars:  # tar shards: checked once listed
        train_dir, val_dir = split_dir(args.data, args.train_split), split_dir(args.data, args.val_split)
        class_names = list_classes(train_dir)
        check_split_classes(class_names, list_classes(val_dir), args.data, args.train_split, args.val_split)
    num_classes = args.num_classes or (len(class_names) if class_names else CIFAR_NUM_CLASSES.get(args.dataset, 1000))
    checkpoint = None
    if args.resume:
        checkpoint = load_checkpoint_file(args.resume)
        layout = None
        if checkpoint.get("model_name") not in (None, args.model):  # maybe a renamed variant of the same model
            with torch.device("meta"):
                layout = state_layout(create_dvt(args, num_classes).state_dict())
        check_resumable(checkpoint, args.resume, args.model, args.img_size, class_names, num_classes, layout)
        if not is_training_checkpoint(checkpoint):
            raise ConfigError(f"--resume {args.resume}: not a training checkpoint of main.py (last.pth.tar or "
                              "best.pth.tar); to start from weights only use --initial-checkpoint or --finetune")
        check_not_rewinding(args.resume, folder, checkpoint, LAST)
        need = 2 * os.path.getsize(args.resume)
    else:
        need = 2 * estimated_checkpoint_bytes(args, num_classes)
    resumed_in_place = args.resume and not args.experiment  # the run folder is the checkpoint's
    check_output_folder(folder, need, label=f"the run folder {folder}" if resumed_in_place else f"--output {args.output}")
    return PreChecked(class_names, checkpoint)


def claim_run_folder(args: argparse.Namespace, env: DistEnv, folder: Path) -> tuple[Path, Optional[RunLock]]:
    """Create the run folder (timestamped ones under a name no other run has) and lock it for
    this run (rank 0); every rank gets the folder, or the same ConfigError."""
    lock, message = None, None
    if env.is_main:
        try:
            if args.experiment or args.resume or under_elastic_launcher():  # a name to find again
                folder.mkdir(parents=True, exist_ok=True)
            else:
                folder = create_unique_folder(folder.parent, folder.name)
            lock = RunLock(folder).acquire()
            if not args.resume and (folder / LAST).is_file():  # written since the first look
                lock.release()
                message = (f"{folder} already holds a run ({LAST}); resume it with --resume {folder / LAST} or "
                           "--auto-resume, or choose another --experiment")
        except RunLockedError as e:
            message = str(e)
        except OSError as e:
            message = f"cannot create the run folder {folder}: {e.strerror or e}; pass another --output"
    name, message = broadcast_object((str(folder), message))
    if message:
        raise ConfigError(message)
    return Path(name), lock


def train(args: argparse.Namespace, env: DistEnv, stop: StopSignal) -> None:
    """The training run, logged to ``log.txt`` in the run folder as well. Nothing is written
    before the checks pass and the run holds its folder's lock."""
    folder = run_folder(args, env)
    checked = check_before_run(args, folder)
    folder, lock = claim_run_folder(args, env, folder)
    file_log = None
    try:
        if env.is_main:
            file_log = add_file_log(folder / "log.txt")
        _train(args, env, stop, folder, checked)
    finally:
        if file_log is not None:
            remove_logging([file_log])
        if lock is not None:
            lock.release()


class TrainData(NamedTuple):
    """The training and validation sets, their loaders, and the sampler that orders each epoch."""
    train_set: SeededDataset
    val_set: Any
    num_classes: int
    sampler: EpochSampler
    train_loader: Any  # a DataLoader, counting unreadable images under --bad-images skip
    val_loader: Any
    train_base: Any = None  # the listed training split, reused for the calibration set


def training_data(args: argparse.Namespace, env: DistEnv) -> TrainData:
    """The datasets (checked against --num-classes and the batch size) and this rank's loaders."""
    train_base, val_set, num_classes = build_datasets(args, args.img_size)
    if args.num_classes is not None:
        if args.num_classes < num_classes:
            raise ConfigError(f"--num-classes {args.num_classes} is smaller than the {num_classes} classes of the data")
        num_classes = args.num_classes
    skip = args.bad_images == "skip"
    train_set = SeededDataset(SkipBadImages(train_base) if skip else train_base, args.seed, STREAM_TRAIN_SAMPLES)
    sampler = EpochSampler(len(train_set), env.world_size, env.rank, args.seed, repeats=args.repeated_aug)
    if sampler.per_rank // args.batch_size < 1:
        raise ConfigError(f"the training set ({len(train_set)} images) has less than one batch per process "
                          f"(--batch-size {args.batch_size} x {env.world_size} processes)")
    train_loader = make_loader(train_set, sampler, args.batch_size, args.workers, env, drop_last=True,
                               pin_memory=args.pin_mem, collate_fn=loader_collate(args.bad_images, fill=True))
    val_loader = make_loader(SkipBadImages(val_set) if skip else val_set,
                             ShardSampler(len(val_set), env.world_size, env.rank),
                             args.batch_size * args.validation_batch_size_multiplier, args.workers, env,
                             pin_memory=args.pin_mem, collate_fn=loader_collate(args.bad_images, fill=False))
    if skip:
        train_loader = BadImageCounter(train_loader, env.rank, "training")
        val_loader = BadImageCounter(val_loader, env.rank, "validation")
    return TrainData(train_set, val_set, num_classes, sampler, train_loader, val_loader, train_base)


def initial_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    """--model with its starting weights, the same on every rank (so is the EMA made from it)."""
    seed_all(args.seed)
    model = create_dvt(args, num_classes)
    if args.initial_checkpoint or args.finetune:
        model = load_start_weights(model, args, num_classes)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    num_exits = model.num_exits
    metric_names = {"loss", "top1", "top5", f"exit{num_exits}_top5"} | {
        f"exit{k}_{m}" for k in range(1, num_exits + 1) for m in ("top1", "loss")}
    if args.eval_metric not in metric_names:
        raise ConfigError(f"--eval-metric {args.eval_metric!r}: {args.model} has {num_exits} exits; "
                          f"choose one of {', '.join(sorted(metric_names))}")
    return model


def mixed_precision(args: argparse.Namespace, env: DistEnv, model: nn.Module, optimizer: torch.optim.Optimizer,
                    needs_scaler: bool) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """Apex (--apex-amp) or a native gradient scaler (float16 autocast): (model, optimizer, scaler or None)."""
    if args.apex_amp:
        from apex import amp as apex_amp  # optional dependency, checked by check_args

        if env.device.type != "cuda":
            raise ConfigError("--apex-amp needs CUDA")
        model, optimizer = apex_amp.initialize(model, optimizer, opt_level="O1")
        return model, optimizer, ApexScaler()
    return model, optimizer, NativeScaler(device=env.device.type) if needs_scaler else None


def resume(args: argparse.Namespace, env: DistEnv, config: dict, model: nn.Module, optimizer: torch.optim.Optimizer,
           model_ema: Any, loss_scaler: Any, lr_scheduler: Any, checkpoint: Optional[dict] = None) -> ResumePoint:
    """Where the run starts: --resume's checkpoint (``checkpoint`` when already read) restored
    (whole training state), else the beginning."""
    point = ResumePoint()
    if args.resume:
        if checkpoint is None:
            checkpoint = load_checkpoint_file(args.resume)
        if not is_training_checkpoint(checkpoint):
            raise ConfigError(f"--resume {args.resume}: not a training checkpoint of main.py (last.pth.tar or "
                              "best.pth.tar); to start from weights only use --initial-checkpoint or --finetune")
        point = restore_training_state(checkpoint, env, model, None if args.no_resume_opt else optimizer,
                                       model_ema, loss_scaler, lr_scheduler)
        changed = [k for k in ("model", "batch_size", "seed", "img_size", "dataset", "mixup", "cutmix", "lr")
                   if checkpoint.get("config", {}).get(k, config[k]) != config[k]]
        if changed:
            _logger.warning(f"resuming with settings that differ from the checkpoint's: {', '.join(changed)}")
        _logger.info(f"resumed {args.resume}: epoch {point.epoch}, step {point.step}, {point.num_updates} updates")
    if args.start_epoch is not None:
        point.epoch, point.step = args.start_epoch, 0
    return point


class Checkpoints:
    """The run's training checkpoints (``last.pth.tar``, ``best.pth.tar``), built from its parts.

    It holds the parts themselves, not the loaders or the training context, so that the
    context's recovery callback makes no reference cycle that would keep loader workers alive.
    """

    def __init__(self, folder: Path, env: DistEnv, config: dict, model: nn.Module, ctx: TrainContext,
                 point: ResumePoint, class_names: Optional[list[str]] = None) -> None:
        self.folder, self.env, self.config, self.model, self.point = folder, env, config, model, point
        self.parts = (ctx.optimizer, ctx.model_ema, ctx.loss_scaler, ctx.lr_scheduler)
        self.class_names = class_names

    def save(self, epoch: int, step: int, updates: int, meter: Optional[ExitMeter] = None,
             metrics: Optional[dict] = None, best: bool = False) -> None:
        """Every rank calls this; rank 0 writes ``last.pth.tar`` (and ``best.pth.tar``)."""
        optimizer, model_ema, loss_scaler, lr_scheduler = self.parts
        point = self.point

        def build(per_rank: list[dict]) -> dict:
            checkpoint = training_checkpoint(self.model, optimizer, epoch, step, updates, self.config, per_rank,
                                             model_ema, loss_scaler, lr_scheduler, point.best_metric, point.best_epoch,
                                             metrics)
            if self.class_names is not None:
                checkpoint["class_names"] = list(self.class_names)
            return checkpoint

        save_training_state(self.folder / LAST, build, self.env, meter, also=[self.folder / BEST] if best else [])

    def save_recovery(self, step: int, updates: int, meter: ExitMeter) -> None:
        """Within the epoch under way (``point.epoch``)."""
        self.save(self.point.epoch, step, updates, meter)


class Run:
    """A training run in progress: its parts, where it is, and what each epoch does."""

    def __init__(self, args: argparse.Namespace, env: DistEnv, folder: Path, config: dict, data: TrainData,
                 model: nn.Module, ctx: TrainContext, point: ResumePoint,
                 class_names: Optional[list[str]] = None) -> None:
        self.args, self.env, self.folder, self.config, self.data = args, env, folder, config, data
        self.model, self.plain, self.ctx, self.point = model, unwrap_model(model), ctx, point
        self.num_exits = self.plain.num_exits
        self.summary = CsvSummary(folder / "summary.csv")
        self.evaluate_ema = ctx.model_ema is not None and not args.model_ema_force_cpu
        self.class_names = class_names
        self.checkpoints = Checkpoints(folder, env, config, model, ctx, point, class_names)
        ctx.save_recovery = self.checkpoints.save_recovery

    def train_epoch(self, epoch: int, stop: StopSignal) -> None:
        """Train one epoch (from the resumed step), or save and raise TrainingInterrupted on a signal."""
        args, ctx, point = self.args, self.ctx, self.point
        point.epoch = epoch
        started = time.time()
        if ctx.mixup_fn is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
            ctx.mixup_fn.mixup_enabled = False
        if ctx.lr_scheduler is not None and args.sched != "plateau":
            ctx.lr_scheduler.step(epoch)  # a pure function of the epoch: also right after a resume
        self.data.sampler.set_epoch(epoch, point.step * args.batch_size)
        meter = None
        if point.step and point.meter_state is not None:
            meter = ExitMeter(self.num_exits, self.env.device)
            meter.load_state_dict(point.meter_state)
        result = train_one_epoch(self.model, self.data.train_loader, ctx, epoch, point.num_updates, point.step, meter)
        point.num_updates = result.num_updates
        if result.interrupted:
            self.checkpoints.save(epoch, result.steps_done, point.num_updates, result.meter)
            raise TrainingInterrupted(stop.signum, self.folder / LAST)
        point.step, point.meter_state = 0, None
        self.finish_epoch(epoch, result, started)

    def finish_epoch(self, epoch: int, result: EpochResult, started: float) -> None:
        """Evaluate (the model, and the EMA), keep the best, write summary.csv and the checkpoints."""
        args, ctx, point, env = self.args, self.ctx, self.point, self.env
        eval_metrics = evaluate(self.plain, self.data.val_loader, env, ctx.amp_dtype, ctx.progress)
        _logger.info(f"val {epoch}: {format_metrics(eval_metrics, self.num_exits)}")
        score_metrics = eval_metrics
        row = {"epoch": epoch, "lr": result.metrics["lr"], **_prefixed("train_", result.metrics),
               "train_img_per_s": result.images_per_second, "train_skipped_steps": result.skipped_steps,
               "train_bad_images": result.bad_images, **_prefixed("eval_", eval_metrics)}
        if self.evaluate_ema:
            ema_metrics = evaluate(ctx.model_ema.module, self.data.val_loader, env, ctx.amp_dtype, ctx.progress,
                                   "val (EMA)")
            _logger.info(f"val {epoch} (EMA): {format_metrics(ema_metrics, self.num_exits)}")
            row.update(_prefixed("ema_eval_", ema_metrics))
            score_metrics = ema_metrics
        score = score_metrics[args.eval_metric]
        if ctx.lr_scheduler is not None:
            ctx.lr_scheduler.step(epoch + 1, score)
        decreasing = args.eval_metric.endswith("loss")
        is_best = point.best_metric is None or (score < point.best_metric if decreasing else score > point.best_metric)
        if is_best:
            point.best_metric, point.best_epoch = score, epoch
        row["epoch_time_s"] = time.time() - started
        self.checkpoints.save(epoch + 1, 0, point.num_updates, metrics=score_metrics, best=is_best)
        if env.is_main:  # after the checkpoint it describes: a failed save leaves no row to repeat on resume
            self.summary.write(row)
        _logger.info(f"epoch {epoch}: {args.eval_metric} {score:.4f} (best {point.best_metric:.4f} at epoch "
                     f"{point.best_epoch}), {result.images_per_second:.1f} img/s training, saved {self.folder / LAST}")

    def release(self) -> None:
        """released.pth.tar from the best checkpoint's weights (EMA or model, --release-weights)."""
        args, folder, point = self.args, self.folder, self.point
        if point.best_epoch is not None:
            _logger.info(f"best {args.eval_metric}: {point.best_metric:.4f} (epoch {point.best_epoch})")
        if not (args.release and (folder / BEST).is_file()):
            return
        which = args.release_weights
        if which == "auto":
            which = "ema" if self.evaluate_ema else "model"
        weights, _ = checkpoint_weights(load_checkpoint_file(folder / BEST), which, str(folder / BEST))
        load_weights(self.plain, weights)
        val_set = self.data.val_set
        if args.bad_images == "skip":
            val_set = SkipBadImages(val_set, substitute=True)
        export_released(self.plain, val_set, calibration_set(args, args.img_size, self.data.train_base), self.env,
                        folder / RELEASED, args.batch_size * args.validation_batch_size_multiplier, args.workers,
                        self.ctx.progress, extra={"weights": which, "best_epoch": point.best_epoch,
                                                  "config": self.config, "class_names": self.class_names})
        _logger.info(f"wrote {folder / RELEASED} ({which} weights of epoch {point.best_epoch})")


def checked_training_data(args: argparse.Namespace, env: DistEnv, stop: StopSignal,
                          checked: PreChecked) -> tuple[TrainData, Optional[list[str]]]:
    """:func:`training_data`, stopped at once by SIGTERM/SIGINT (nothing to save yet), with the
    validation images checked for decompression bombs; and the class names to store."""
    with signals_raise(stop.signum):
        data = training_data(args, env)
        val_files = [path for path, _ in getattr(data.val_set, "samples", [])]
        if getattr(args, "bad_images", "error") == "error":
            check_image_sizes(val_files)
    train_classes = getattr(getattr(data.train_set, "dataset", None), "classes", None)
    if checked.class_names is None and train_classes is not None and hasattr(data.val_set, "classes"):
        # tar shards and CIFAR: their classes are known once read
        check_split_classes(list(train_classes), list(data.val_set.classes), args.data, args.train_split,
                            args.val_split)
    names = checked.class_names or list(getattr(data.val_set, "classes", None) or []) or None
    if names is not None and len(names) != data.num_classes:
        names = None  # --num-classes gave more heads than the dataset has classes: no name for each
    warning = few_classes_warning(len(names) if names else data.num_classes)
    if warning:
        _logger.warning(warning)
    return data, names


def _train(args: argparse.Namespace, env: DistEnv, stop: StopSignal, folder: Path, checked: PreChecked) -> None:
    """The outline of a run: setup, data, model, optimizer, resume, the epochs, the release."""
    config = resolved_config(args)
    if env.is_main:
        with open(folder / CONFIG_FILE, "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)

    data, class_names = checked_training_data(args, env, stop, checked)
    model = initial_model(args, data.num_classes).to(env.device)

    amp_dtype, needs_scaler = amp_settings(args, env.device)
    lr = scaled_lr(args, env.world_size)
    optimizer = build_optimizer(args, model, lr)
    model, optimizer, loss_scaler = mixed_precision(args, env, model, optimizer, needs_scaler)
    model_ema = build_ema(args, model)
    if args.compile:  # after the EMA copy, which stays eager; in place, so parameter names do not change
        model.compile(dynamic=True)
    lr_scheduler, num_epochs = build_scheduler(args, optimizer, data.sampler.per_rank // args.batch_size)
    point = resume(args, env, config, model, optimizer, model_ema, loss_scaler, lr_scheduler,
                   checked.resume_checkpoint)

    if env.distributed:
        model = DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    mixup_fn, loss_fn = build_mixup_and_loss(args, data.num_classes)
    ctx = TrainContext(
        optimizer=optimizer, loss_fn=loss_fn, env=env, seed=args.seed, amp_dtype=amp_dtype,
        loss_scaler=loss_scaler, clip_grad=args.clip_grad, clip_mode=args.clip_mode, model_ema=model_ema,
        ema_warmup=args.model_ema_warmup, mixup_fn=mixup_fn, lr_scheduler=lr_scheduler,
        log_interval=args.log_interval, progress=_progress(args, env), stop=stop,
        recovery_interval=args.recovery_interval, bad_image_fraction=args.bad_images_max_fraction,
        normalize=device_normalize(args),
        guard=StepGuard(env, args.max_bad_steps, parse_injections(args.inject_nonfinite)))
    n_params = sum(p.numel() for p in unwrap_model(model).parameters())
    _logger.info(
        f"{args.model}: {n_params / 1e6:.2f}M parameters, {unwrap_model(model).num_exits} exits, "
        f"{data.num_classes} classes, {args.img_size}px | {env.world_size} process(es) on {env.device.type}"
        f"{' (' + env.backend + ')' if env.backend else ''} | batch {args.batch_size} x {env.world_size}, "
        f"lr {lr:.3g}, {args.opt}, epochs {num_epochs} | precision "
        f"{'apex O1' if args.apex_amp else amp_dtype or 'float32'} | EMA {'on' if model_ema else 'off'} | "
        f"{len(data.train_set)} training / {len(data.val_set)} validation images | run folder {folder}")

    run = Run(args, env, folder, config, data, model, ctx, point, class_names)
    for epoch in range(point.epoch, num_epochs):
        run.train_epoch(epoch, stop)
        if agreed_flags(env, stop.requested)[0]:
            raise TrainingInterrupted(stop.signum or 15, folder / LAST)
    try:
        with signals_raise(stop.signum):  # no step to stop at: a signal ends the export at once
            run.release()
    except Interrupted as e:
        raise Interrupted(e.signum, f" during the export of {folder / RELEASED}: the export stopped, the training "
                          f"is complete ({folder / BEST}); write the released file with: python main.py {args.data} "
                          f"--export-released {folder / BEST}") from None


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
    try:
        with deterministic_mode(args.deterministic):
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
    except Interrupted as e:  # before the training started (nothing to save) or during the export
        _logger.warning(f"{e}")
        return 128 + e.signum
    except (ConfigError, CheckpointError, DataError, NonFiniteLossError) as e:
        shared = isinstance(e, (ConfigError, NonFiniteLossError))  # every rank raises the same one
        if rank == 0 or not shared:
            prefix = f"rank {rank}: " if env is not None and env.distributed and not shared else ""
            extra = " The last good checkpoint is left as it was." if isinstance(e, NonFiniteLossError) else ""
            print(f"error: {prefix}{one_line(e)}{extra}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except RuntimeError as e:
        if not (args.deterministic and "deterministic" in str(e)):
            raise
        print(f"error: --deterministic: {one_line(e)}", file=sys.stderr)  # an operation with no deterministic kernel
        return 1
    except OSError as e:  # a log, summary or config write (disk full, read-only, quota)
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}; checkpoints already written are left as they were: fix this, then "
              "run again (--resume the run folder's last.pth.tar)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        close_loaders()  # before the interpreter's exit, which would wait for the workers for ever
        cleanup_distributed()
        remove_logging(handlers)


if __name__ == "__main__":
    sys.exit(main())

"""main.py's command line: its options (the names of the original DVT / timm training script),
grouped as ``--help`` shows them, read over a ``--config`` file, and the checks that reject
settings which cannot work before anything slow starts."""
from __future__ import annotations

import argparse
import importlib.util
import re
from typing import Optional, Sequence

import torch
from timm.optim import list_optimizers

from models.factory import is_cascade_name, is_single_exit, unknown_model_message

from ..data.cifar import CIFAR_NUM_CLASSES
from ..data.images import BAD_IMAGE_POLICIES
from ..data.loader import CALIB_SEED
from ..data.transforms import check_auto_augment
from ..errors import ConfigError
from ..train.guard import parse_injections
from ..train.recipe import check_scheduler, mixup_active
from .config import ModelKwargs, parse_with_config
from .preflight import check_finite_options
from .records import tensorboard_missing

AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
DATASETS = ("imagenet", "folder", "cifar10", "cifar100")


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
                   help="DVT model, or any timm classifier trained as a single-exit baseline "
                        "(deit_small_patch16_224, ...)")
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
    g.add_argument("--grad-accum-steps", type=int, default=1, metavar="N",
                   help="sum the gradients of N batches in each optimizer update: the global batch is "
                        "batch size x processes x N (the recipes' batch on fewer GPUs)")
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
    g.add_argument("--tensorboard", action="store_true",
                   help="also write the epoch metrics (per-exit loss and top-1, dynamic top-1 at a few budgets, "
                        "learning rate, img/s, skipped steps) as TensorBoard scalars in RUN_FOLDER/tensorboard")
    g.add_argument("--log-interval", type=int, default=50, metavar="N",
                   help="steps between log lines (and between reads of the stop flag and skip counters)")
    g.add_argument("--max-bad-steps", type=int, default=10, metavar="K",
                   help="stop after K training steps in a row with a non-finite loss (each is skipped; 0: never stop)")
    g.add_argument("--inject-nonfinite", nargs="*", default=[], metavar="EPOCH:STEP[@RANK]",
                   help="debugging: make the loss of these steps NaN (on every rank, or on RANK)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars on rank 0 (default: when stdout is a terminal; written to a file or a pipe, "
                        "a plain line a minute, or every DVT_PROGRESS_INTERVAL seconds)")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command line over config file over built-in defaults."""
    return parse_with_config(build_parser(), argv)


def dashed(dest: str) -> str:
    """The flag of an option: ``batch_size`` -> ``--batch-size``."""
    return "--" + dest.replace("_", "-")


def check_args(args: argparse.Namespace) -> None:
    """Reject settings that cannot work, before anything slow."""
    if args.data and args.data_dir and args.data != args.data_dir:
        raise ConfigError(f"two dataset folders: DIR {args.data} and --data-dir {args.data_dir}")
    args.data = args.data or args.data_dir
    args.data_dir = None
    if args.data is None:
        raise ConfigError("no dataset folder: pass DIR (or --data-dir DIR, or 'data' in the config)")
    positive = dict(batch_size=args.batch_size, grad_accum_steps=args.grad_accum_steps, img_size=args.img_size,
                    epochs=args.epochs,
                    validation_batch_size_multiplier=args.validation_batch_size_multiplier,
                    calib_size=args.calib_size)
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"{dashed(name)} must be at least 1, got {value}")
    if args.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {args.workers}")
    for flag in ("initial_checkpoint", "finetune", "resume"):
        others = [f for f in ("initial_checkpoint", "finetune", "resume") if f != flag and getattr(args, f)]
        if getattr(args, flag) and others:
            raise ConfigError(f"{dashed(flag)} and {dashed(others[0])} cannot be used together")
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
        raise ConfigError(unknown_model_message(args.model))
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
    check_auto_augment(args.aa)
    if args.tensorboard and tensorboard_missing():
        raise ConfigError(tensorboard_missing())
    parse_injections(args.inject_nonfinite)
    check_finite_options(vars(args))
    check_scheduler(args)

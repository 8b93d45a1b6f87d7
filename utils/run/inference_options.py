"""inference.py's command line: its options, grouped as ``--help`` shows them (the original
ones first), and the checks that reject combinations which cannot work, before anything slow
starts."""
from __future__ import annotations

import argparse
import os
from typing import Optional

import torch

from models.factory import is_cascade_name, unknown_model_message
from models.registry import MODEL_CFGS

from ..budget.report import PLOT_FILE, RESULTS_JSON
from ..data.classes import LABEL_TYPES
from ..data.loader import CALIB_SEED
from ..errors import ConfigError

DEFAULT_MODEL = "DVT_T2t_vit_12"
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Evaluate a DVT checkpoint: per-exit accuracy and budgeted batch classification.")
    orig = parser.add_argument_group("original options")
    orig.add_argument("--data_url", default="./data", type=str,
                      help="dataset folder with train/ and val/ ImageFolders (default: ./data)")
    orig.add_argument("--batch_size", default=64, type=int, help="mini-batch size (default: 64)")
    orig.add_argument("--model", default=None, type=str,
                      help=f"model name (default: the checkpoint's own, else {DEFAULT_MODEL}); "
                           f"one of {', '.join(MODEL_CFGS)}, or a timm model trained as a single-exit baseline")
    orig.add_argument("--checkpoint_path", default=None, type=str,
                      help="checkpoint file or model folder (required, except by --predict with --runtime "
                           "onnxruntime)")
    orig.add_argument("--eval_mode", default=2, type=int, choices=(0, 1, 2),
                      help="0: print the checkpoint's stored results; 1: evaluate val with the stored "
                           "thresholds; 2: find thresholds on training images, evaluate val (default: 2)")
    run = parser.add_argument_group("running")
    run.add_argument("--device", default=None, type=str,
                     help="torch device (default: cuda if available, else cpu)")
    run.add_argument("--workers", default=min(8, os.cpu_count() or 1), type=int,
                     help="data loading processes (default: min(8, cores))")
    run.add_argument("--amp", nargs="?", const="auto", default=None, choices=("auto", *AMP_DTYPES),
                     help="autocast; bare --amp: fp16 on CUDA, bf16 on a CPU with native bf16, else float32 "
                          "with a warning (fp16 needs CUDA)")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the all-exit forward and, for --early_exit, each stage (one graph for "
                          "every batch size; inductor's freezing: the weights become constants of the graphs); the "
                          "first batches take longer while it compiles")
    run.add_argument("--img_size", default=None, type=int,
                     help="input resolution (default: the checkpoint's, else 224)")
    run.add_argument("--num_classes", default=None, type=int,
                     help="classes of the heads (default: the checkpoint heads' size)")
    run.add_argument("--allow_class_mismatch", "--allow-class-mismatch", action="store_true",
                     help="evaluate even when the dataset's classes are not the checkpoint's (names when it "
                          "stores them, else their number); without it such a run stops before evaluating")
    run.add_argument("--no_progress", action="store_true",
                     help="no progress bars (off a terminal they are a plain line a minute, or every "
                          "DVT_PROGRESS_INTERVAL seconds)")
    add_calibration_args(parser)
    add_predict_args(parser)
    return parser


def add_calibration_args(parser: argparse.ArgumentParser) -> None:
    """Calibration, budgets and early exit, and the output files."""
    calib = parser.add_argument_group("calibration (mode 2 and --budget)")
    calib.add_argument("--calib_size", default=50000, type=int,
                       help="random training images used to find thresholds (default: 50000)")
    calib.add_argument("--calib_transform", default="train", choices=("train", "eval"),
                       help="augmentation of the calibration images: 'train' (random crop and flip, as "
                            "the original) or 'eval' (resize and center crop) (default: train)")
    calib.add_argument("--seed", "--calib_seed", dest="seed", default=CALIB_SEED, type=int,
                       help="seed of the calibration images and their augmentation; the default is main.py's "
                            f"--calib-seed default, so both give the same weights the same thresholds "
                            f"(default: {CALIB_SEED})")
    budget = parser.add_argument_group("budgets and early exit")
    budget.add_argument("--budget", nargs="+", default=[], type=float, metavar="GFLOPS",
                        help="average GFLOPs per image: find the most accurate thresholds within it on the "
                             "calibration set and evaluate them on val")
    budget.add_argument("--budget_index", nargs="+", default=[], type=int, metavar="P",
                        help="row P (1-based, as the original's budgets p = 1..59) of the thresholds, "
                             "for --early_exit")
    budget.add_argument("--early_exit", action="store_true",
                        help="also run val adaptively (later stages only on samples not yet confident) with "
                             "the thresholds of every --budget / --budget_index, and measure images/second; the "
                             "samples that go on wait for a full --batch_size of them before a later stage runs")
    budget.add_argument("--early_exit_per_batch", action="store_true",
                        help="with --early_exit, run each val batch on its own: the later stages on the few "
                             "samples of that batch that go on (lower latency per batch, lower throughput)")
    out = parser.add_argument_group("outputs")
    out.add_argument("--output", default=None, type=str,
                     help=f"folder for {RESULTS_JSON} (every number and setting) and {PLOT_FILE}")
    out.add_argument("--save_checkpoint", default=None, type=str,
                     help="write the checkpoint with the new flops, anytime_classification, dynamic_threshold "
                          "and budgeted_batch_classification (modes 1 and 2)")


def add_predict_args(parser: argparse.ArgumentParser) -> None:
    pred = parser.add_argument_group(
        "classifying images (--predict)",
        "with --predict, --budget GFLOPS picks the most accurate row of the checkpoint's stored thresholds whose "
        "expected cost fits, --budget_index P takes row P, and --output names a .csv or .jsonl file")
    pred.add_argument("--predict", nargs="+", default=None, metavar="PATH",
                      help="classify these image files, folders (recursively) and text files of image paths")
    pred.add_argument("--thresholds", nargs="+", default=None, type=float, metavar="T",
                      help="confidence threshold of each exit but the last (before --budget and --budget_index)")
    pred.add_argument("--topk", nargs="?", const=5, default=0, type=int, metavar="K",
                      help="also write the K most probable classes (bare --topk: 5)")
    pred.add_argument("--label_type", "--label-type", default="description", choices=LABEL_TYPES,
                      help="class label written: description (ImageNet lemmas, or the class name), name (the "
                           "class name; the WordNet id for ImageNet), detailed, none (default: description)")
    pred.add_argument("--resume", action="store_true",
                      help="continue the --output an interrupted run left: its whole rows are kept, the rest is "
                           "classified; the finished file is the one an uninterrupted run writes")
    pred.add_argument("--overwrite", action="store_true",
                      help="replace an existing --output (without --resume or --overwrite an existing one is "
                           "refused)")
    pred.add_argument("--runtime", default="torch", choices=("torch", "onnxruntime"),
                      help="run the stages in PyTorch from --checkpoint_path (default) or in ONNX Runtime from "
                           "--onnx DIR (pip install -r requirements-deploy.txt)")
    pred.add_argument("--onnx", default=None, metavar="DIR",
                      help="folder written by scripts/export_onnx.py, for --runtime onnxruntime")
    pred.add_argument("--ort_providers", "--ort-providers", nargs="+", default=None, metavar="NAME",
                      help="ONNX Runtime execution providers in order: cpu, cuda, tensorrt or onnxruntime's "
                           "names (default: --device's, else cuda when available, then cpu)")
    pred.add_argument("--class_names", "--class-names", default=None, metavar="FILE",
                      help="class names, one per line or a JSON list, instead of the checkpoint's "
                           "(default: its class_names; ImageNet's for 1000 classes without names)")


def check_args(args: argparse.Namespace) -> None:
    """Reject option combinations that cannot work, before any slow step."""
    if args.batch_size < 1:
        raise ConfigError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {args.workers}")
    if args.calib_size < 1:
        raise ConfigError(f"--calib_size must be at least 1, got {args.calib_size}")
    if args.img_size is not None and args.img_size < 1:
        raise ConfigError(f"--img_size must be positive, got {args.img_size}")
    if args.num_classes is not None and args.num_classes < 1:
        raise ConfigError(f"--num_classes must be positive, got {args.num_classes}")
    check_model_name(args.model)
    if args.runtime != "torch" or args.onnx is not None or args.ort_providers is not None:
        raise ConfigError("--runtime, --onnx and --ort_providers are for --predict")
    if args.eval_mode == 0:
        for flag, given in (("--budget", args.budget), ("--budget_index", args.budget_index),
                            ("--early_exit", args.early_exit), ("--save_checkpoint", args.save_checkpoint)):
            if given:
                raise ConfigError(f"{flag} needs --eval_mode 1 or 2 (mode 0 runs no model)")
    for flag, given in (("--resume", args.resume), ("--overwrite", args.overwrite)):
        if given:
            raise ConfigError(f"{flag} is for --predict")
    if args.early_exit and not (args.budget or args.budget_index):
        raise ConfigError("--early_exit needs thresholds: give --budget GFLOPS or --budget_index P")
    if args.budget_index and not args.early_exit:
        raise ConfigError("--budget_index is used with --early_exit")
    if args.early_exit_per_batch and not args.early_exit:
        raise ConfigError("--early_exit_per_batch is used with --early_exit")
    if any(p < 1 for p in args.budget_index):
        raise ConfigError(f"--budget_index counts from 1, got {args.budget_index}")


def check_model_name(name: Optional[str]) -> None:
    if name is not None and not is_cascade_name(name):
        raise ConfigError(unknown_model_message(name))


def require_checkpoint(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--checkpoint_path, which every run needs but --predict in ONNX Runtime (argparse's
    message and status 2 when it is missing)."""
    if args.checkpoint_path is None and not (args.predict is not None and args.runtime == "onnxruntime"):
        parser.error("the following arguments are required: --checkpoint_path")


def check_runtime_args(args: argparse.Namespace) -> None:
    """--runtime onnxruntime takes its model from --onnx alone; the ONNX options go with it only."""
    if args.runtime == "onnxruntime":
        if args.onnx is None:
            raise ConfigError("--runtime onnxruntime needs --onnx DIR (a folder written by scripts/export_onnx.py)")
        for flag, given in (("--checkpoint_path", args.checkpoint_path), ("--model", args.model),
                            ("--amp", args.amp), ("--compile", args.compile)):
            if given:
                raise ConfigError(f"{flag} does not go with --runtime onnxruntime: the --onnx folder fixes the model "
                                  "(float32; choose the hardware with --device or --ort_providers)")
    elif args.onnx is not None:
        raise ConfigError("--onnx DIR is read with --runtime onnxruntime")
    elif args.ort_providers is not None:
        raise ConfigError("--ort_providers goes with --runtime onnxruntime")


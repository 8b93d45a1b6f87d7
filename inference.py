"""Evaluate a DVT checkpoint: per-exit accuracy and budgeted batch classification.

Usage (the original interface)::

    python inference.py --data_url PATH --batch_size 64 --model DVT_T2t_vit_12 \\
        --checkpoint_path CKPT --eval_mode {0,1,2}

``PATH`` holds ``train/`` and ``val/`` ImageFolders. Modes:

* 0: print the numbers stored in the checkpoint (no data, no model);
* 1: evaluate the validation set with the thresholds stored in the checkpoint;
* 2: find thresholds for the 59 budgets on a random subset of the training set, then
  evaluate the validation set.

Three lines report the results, readable with ``ast.literal_eval`` after the ``" : "``::

    flops : [...]
    anytime_classification : [...]
    budgeted_batch_classification : [[...], [...]]

Beyond the original: ``--budget GFLOPS`` picks thresholds for an average cost,
``--early_exit`` runs the validation set adaptively and measures the real throughput,
``--output DIR`` writes every number as JSON and an accuracy/GFLOPs plot, and
``--save_checkpoint FILE`` stores newly found thresholds and results for modes 0 and 1.
Progress and notes go to stderr; results to stdout.

Classifying one's own images (no labels; see :mod:`utils.predict`)::

    python inference.py --checkpoint_path CKPT --predict PATH [PATH ...] [--budget GFLOPS] [--output preds.csv]

``PATH``: image files, folders (walked recursively) or text files listing image paths. The
thresholds come from ``--thresholds``, else ``--budget`` or ``--budget_index`` resolved against
the checkpoint's stored table, else a default row (:mod:`utils.budget.choice`). One row per
image goes to ``--output`` (``.csv`` or ``.jsonl``) or, without it, to stdout as CSV.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

import torch
from tqdm.auto import tqdm

from models import DVT
from models.deploy import CompiledCascade
from models.factory import is_cascade_name
from models.registry import MODEL_CFGS
from utils.budget.flops import exit_gflops
from utils.budget.plots import OperatingPoint, plot_accuracy_vs_gflops
from utils.budget.stats import ExitStatsAccumulator, anytime_accuracy, collect_exit_stats
from utils.budget.thresholds import (
    DEFAULT_BUDGETS,
    BudgetThresholds,
    budget_curve,
    budget_exit_shares,
    evaluate_thresholds,
    exit_assignment,
    find_thresholds,
    thresholds_for_budget,
)
from utils.checkpoint.files import atomic_save, load_checkpoint_file
from utils.checkpoint.weights import build_from_checkpoint, checkpoint_model_name
from utils.data.classes import LABEL_TYPES, check_checkpoint_classes, check_split_classes
from utils.data.folders import build_split, split_dir
from utils.data.loader import CALIB_SEED, calibration_subset
from utils.data.scan import list_classes
from utils.data.transforms import calibration_transform, eval_transform
from utils.errors import CheckpointError, DataError, one_line
from utils.precision import autocast_context, resolve_precision
from utils.predict.classifier import DVTClassifier
from utils.predict.output import PredictionSummary, PredictionWriter, output_format
from utils.predict.sources import check_sources
from utils.run.preflight import check_output_folder, check_writable_file
from utils.run.signals import CTRL_C, worker_ignores_signals

DEFAULT_MODEL = "DVT_T2t_vit_12"
RESULT_KEYS = ("flops", "anytime_classification", "budgeted_batch_classification")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
RESULTS_JSON = "results.json"
PLOT_FILE = "accuracy_vs_gflops.png"


class UsageError(ValueError):
    """Options that do not fit together."""


# ------------------------------------------------------------------------ arguments

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
    orig.add_argument("--checkpoint_path", required=True, type=str, help="checkpoint file")
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
                          "every batch size); the first batches take longer while it compiles")
    run.add_argument("--img_size", default=None, type=int,
                     help="input resolution (default: the checkpoint's, else 224)")
    run.add_argument("--num_classes", default=None, type=int,
                     help="classes of the heads (default: the checkpoint heads' size)")
    run.add_argument("--allow_class_mismatch", "--allow-class-mismatch", action="store_true",
                     help="evaluate even when the dataset's classes are not the checkpoint's (names when it "
                          "stores them, else their number); without it such a run stops before evaluating")
    run.add_argument("--no_progress", action="store_true", help="no progress bars")
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
                             "the thresholds of every --budget / --budget_index, and measure images/second")
    out = parser.add_argument_group("outputs")
    out.add_argument("--output", default=None, type=str,
                     help=f"folder for {RESULTS_JSON} (every number and setting) and {PLOT_FILE}")
    out.add_argument("--save_checkpoint", default=None, type=str,
                     help="write the checkpoint with the new flops, anytime_classification, dynamic_threshold "
                          "and budgeted_batch_classification (modes 1 and 2)")
    add_predict_args(parser)
    return parser


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
    pred.add_argument("--class_names", "--class-names", default=None, metavar="FILE",
                      help="class names, one per line or a JSON list, instead of the checkpoint's "
                           "(default: its class_names; ImageNet's for 1000 classes without names)")


def check_args(args: argparse.Namespace) -> None:
    """Reject option combinations that cannot work, before any slow step."""
    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    if args.calib_size < 1:
        raise UsageError(f"--calib_size must be at least 1, got {args.calib_size}")
    if args.img_size is not None and args.img_size < 1:
        raise UsageError(f"--img_size must be positive, got {args.img_size}")
    if args.num_classes is not None and args.num_classes < 1:
        raise UsageError(f"--num_classes must be positive, got {args.num_classes}")
    if args.model is not None and not is_cascade_name(args.model):
        raise UsageError(f"unknown model {args.model!r}; choose one of: {', '.join(MODEL_CFGS)}, "
                         "or a timm model (single-exit baseline)")
    if args.eval_mode == 0:
        for flag, given in (("--budget", args.budget), ("--budget_index", args.budget_index),
                            ("--early_exit", args.early_exit), ("--save_checkpoint", args.save_checkpoint)):
            if given:
                raise UsageError(f"{flag} needs --eval_mode 1 or 2 (mode 0 runs no model)")
    if args.early_exit and not (args.budget or args.budget_index):
        raise UsageError("--early_exit needs thresholds: give --budget GFLOPS or --budget_index P")
    if args.budget_index and not args.early_exit:
        raise UsageError("--budget_index is used with --early_exit")
    if any(p < 1 for p in args.budget_index):
        raise UsageError(f"--budget_index counts from 1, got {args.budget_index}")


def resolve_device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"bad --device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return device


def resolve_amp(amp: Optional[str], device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of --amp on ``device`` (utils.precision's rule, shared with main.py)."""
    try:
        precision = resolve_precision(amp, device)
    except ValueError as e:
        raise UsageError(f"--amp {amp}: {e}") from None
    if precision.warning:
        note(f"warning: {precision.warning}")
    return precision.dtype


# ----------------------------------------------------------------------- checkpoint

def plain(value: Any) -> Any:
    """Tensors, numpy values and nested lists of them -> Python numbers and lists (printable,
    JSON-serialisable, ``ast.literal_eval``-readable); Python numbers are kept as they are."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().tolist()
    elif hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy arrays and scalars
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def require_entries(checkpoint: dict, keys: Sequence[str], path: str, purpose: str) -> None:
    missing = [k for k in keys if k not in checkpoint]
    if missing:
        have = ", ".join(map(str, checkpoint)) or "nothing"
        raise CheckpointError(
            f"{path} has no {', '.join(repr(k) for k in missing)} entry, needed {purpose} (it holds: {have})")


def build_model(args: argparse.Namespace, checkpoint: dict, path: str) -> DVT:
    """The checkpoint's model with its weights loaded (the EMA weights of a training
    checkpoint that has them), in eval mode on the CPU."""
    overrides = {k: v for k, v in (("img_size", args.img_size), ("num_classes", args.num_classes)) if v is not None}
    model, _ = build_from_checkpoint(checkpoint, path, name=args.model, default_name=DEFAULT_MODEL, **overrides)
    return model


# ----------------------------------------------------------------------------- data

class QuietCtrlCLoader(torch.utils.data.DataLoader):
    """A DataLoader that starts its workers with Ctrl-C held back (see :class:`utils.run.signals.CtrlC`)."""

    def __iter__(self):
        if self.num_workers == 0:
            return super().__iter__()
        with CTRL_C.holding():
            return super().__iter__()


def make_loader(dataset, args: argparse.Namespace, device: torch.device, seed: int) -> torch.utils.data.DataLoader:
    """In-order loader (its generator, seeded, leaves the global one alone)."""
    return QuietCtrlCLoader(
        dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(seed),
        worker_init_fn=functools.partial(worker_ignores_signals, signals=(signal.SIGINT,)) if args.workers > 0 else None)


def check_outputs(args: argparse.Namespace) -> None:
    """--output and --save_checkpoint can be written, before any slow step."""
    if args.output:
        check_output_folder(args.output, 0, "--output")
    if args.save_checkpoint:
        check_writable_file(args.save_checkpoint, "--save_checkpoint")


def check_classes(args: argparse.Namespace, checkpoint: dict, model: DVT, val_set: Any, calibrates: bool) -> None:
    """The validation classes are the checkpoint's (and the calibration split's), or stop."""
    names = list(val_set.classes)
    if calibrates:
        check_split_classes(list_classes(split_dir(args.data_url, "train")), names, args.data_url)
    warning = check_checkpoint_classes(checkpoint.get("class_names"), model.num_classes, names,
                                       args.checkpoint_path, args.allow_class_mismatch)
    if warning:
        note(warning)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ValRun(NamedTuple):
    """Validation results of running every exit, and of each early-exit threshold set.

    confidence, correct, prediction: (E, N) of every exit; targets: (N,); seconds: model time
    of all exits; early: per threshold set, (exit_index (N,), prediction (N,), seconds).
    """
    confidence: torch.Tensor
    correct: torch.Tensor
    prediction: torch.Tensor
    targets: torch.Tensor
    seconds: float
    early: list[tuple[torch.Tensor, torch.Tensor, float]]


@torch.no_grad()
def run_validation(
        model: DVT,
        loader: torch.utils.data.DataLoader,
        device: torch.device,
        amp_dtype: Optional[torch.dtype],
        early_thresholds: Sequence[torch.Tensor] = (),
        progress: bool = True,
) -> ValRun:
    """Run every exit on each batch and, on the same batch, the adaptive cascade for every
    threshold set. Only model time is counted (data loading excluded); with early exit, the
    first batch is run once untimed first so one-off setup costs do not skew the rates.

    Args:
        model: the cascade, in eval mode, on ``device``.
        loader: (images, targets) batches.
        device: where the model runs.
        amp_dtype: autocast dtype, or None for full precision.
        early_thresholds: (E,) thresholds per adaptive run.
        progress: show a progress bar.
    """
    stats = ExitStatsAccumulator()
    predictions: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    seconds = 0.0
    early = [([], [], 0.0) for _ in early_thresholds]
    warm = not early_thresholds
    for images, targets in tqdm(loader, desc="val", disable=not progress, leave=False):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast_context(device, amp_dtype):
            if not warm:
                model(images)
                for thresholds in early_thresholds:
                    model.forward_early_exit(images, thresholds)
                warm = True
            sync(device)
            start = time.perf_counter()
            logits = model(images)
            sync(device)
            seconds += time.perf_counter() - start
            for j, thresholds in enumerate(early_thresholds):
                start = time.perf_counter()
                out = model.forward_early_exit(images, thresholds)
                sync(device)
                elapsed = time.perf_counter() - start
                exits, preds, t = early[j]
                exits.append(out.exit_index.cpu())
                preds.append(out.logits.argmax(dim=-1).cpu())
                early[j] = (exits, preds, t + elapsed)
        stats.update(logits, targets)
        predictions.append(torch.stack([x.argmax(dim=-1) for x in logits]).cpu())  # (E, B)
        labels.append(targets.cpu())
    confidence, correct = stats.result()
    return ValRun(confidence, correct, torch.cat(predictions, dim=1), torch.cat(labels), seconds,
                  [(torch.cat(e), torch.cat(p), t) for e, p, t in early])


# ------------------------------------------------------------------------- reports

def exit_shares(exit_index: torch.Tensor, num_exits: int) -> list[float]:
    counts = torch.bincount(exit_index, minlength=num_exits)[:num_exits]
    return [c / max(exit_index.numel(), 1) for c in counts.tolist()]


def expected_gflops(shares: Sequence[float], flops: Sequence[float]) -> float:
    return float(sum(s * f for s, f in zip(shares, flops)))


def fmt_list(values: Sequence[float], digits: int = 4) -> str:
    return "[" + ", ".join(f"{v:.{digits}g}" for v in values) + "]"


def write_json(obj: dict, path: Path) -> None:
    """Write atomically, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=True) + "\n")
    os.replace(tmp, path)


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- steps

def print_results(flops: Sequence, anytime: Sequence, curve: Sequence) -> None:
    """The original's three result lines."""
    print("flops :", flops)
    print("anytime_classification :", anytime)
    print("budgeted_batch_classification :", curve)


def show_stored(args: argparse.Namespace, checkpoint: dict, report: dict) -> None:
    """Mode 0: the checkpoint's own numbers, exactly as stored (as plain Python numbers)."""
    path = args.checkpoint_path
    require_entries(checkpoint, RESULT_KEYS, path, "by --eval_mode 0")
    if args.model is not None:
        checkpoint_model_name(checkpoint, path, args.model, DEFAULT_MODEL)
    flops, anytime, curve = (plain(checkpoint[k]) for k in RESULT_KEYS)
    print_results(flops, anytime, curve)
    if args.output:
        report.update(flops=flops, anytime_classification=anytime, budgeted_batch_classification=curve,
                      dynamic_threshold=plain(checkpoint.get("dynamic_threshold")),
                      model_name=checkpoint.get("model_name", args.model))
        save_outputs(args, report, flops, anytime, curve, [])


def exit_costs(model: DVT, checkpoint: dict, path: str) -> tuple[list[float], str]:
    """Cumulative GFLOPs per exit: the checkpoint's, else counted on the model; and which."""
    if "flops" not in checkpoint:
        flops = exit_gflops(model, model.img_size)
        note(f"the checkpoint has no 'flops'; counted with utils.budget.flops.exit_gflops: {fmt_list(flops)}")
        return flops, "counted"
    flops = plain(checkpoint["flops"])
    if not isinstance(flops, list) or len(flops) != model.num_exits:
        raise CheckpointError(f"{path}: 'flops' must list one cumulative GFLOPs value per exit "
                              f"({model.num_exits}), got {flops!r}")
    return [float(f) for f in flops], "checkpoint"


def stored_thresholds(checkpoint: dict, path: str, num_exits: int) -> torch.Tensor:
    thresholds = torch.as_tensor(plain(checkpoint["dynamic_threshold"]), dtype=torch.float32)
    if thresholds.dim() != 2 or thresholds.shape[1] != num_exits:
        raise CheckpointError(f"{path}: 'dynamic_threshold' must be (budgets, {num_exits}), "
                              f"got shape {tuple(thresholds.shape)}")
    return thresholds


def calibrate(args: argparse.Namespace, model: DVT, device: torch.device, amp_dtype: Optional[torch.dtype],
              ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Exit statistics on a seeded random subset of the training set: (confidence, correct, size)."""
    size = model.img_size
    transform = calibration_transform(size) if args.calib_transform == "train" else eval_transform(size)
    calib_set = calibration_subset(build_split(args.data_url, "train", transform), args.calib_size, args.seed)
    note(f"calibration: {len(calib_set)} training images ({args.calib_transform} transform, seed {args.seed})")
    confidence, correct = collect_exit_stats(
        model, make_loader(calib_set, args, device, args.seed), device, amp_dtype, desc="calibration",
        progress=not args.no_progress)
    return confidence, correct, len(calib_set)


def budget_report(target: float, found: BudgetThresholds, val: ValRun, flops: Sequence[float]) -> dict:
    """Thresholds chosen on the calibration set for an average cost, evaluated on val."""
    top1, gflops = evaluate_thresholds(val.confidence, val.correct, flops, found.thresholds)
    shares = exit_shares(exit_assignment(val.confidence, found.thresholds), len(flops))
    print(f"budget {target:g} GFLOPs : top-1 {top1:.2f}% at {gflops:.4g} GFLOPs on val "
          f"(calibration: {found.top1:.2f}% at {found.expected_gflops:.4g} GFLOPs), "
          f"thresholds {fmt_list(found.thresholds.tolist())}, exit shares {fmt_list(shares, 3)}")
    return dict(target_gflops=target, thresholds=found.thresholds.tolist(), ratio=found.ratio,
                calib_gflops=found.expected_gflops, calib_top1=found.top1, val_top1=top1, val_gflops=gflops,
                val_exit_shares=shares)


def early_exit_report(label: str, thresholds: torch.Tensor, run: tuple[torch.Tensor, torch.Tensor, float],
                      val: ValRun, flops: Sequence[float]) -> dict:
    """Accuracy, exit shares and speed of one adaptive run, checked against the simulation."""
    exit_index, prediction, seconds = run
    num_exits, n = val.confidence.shape
    simulated = exit_assignment(val.confidence, thresholds)
    simulated_prediction = val.prediction.gather(0, simulated.clamp(max=num_exits - 1).unsqueeze(0)).squeeze(0)
    shares = exit_shares(exit_index, num_exits)
    gflops = expected_gflops(shares, flops)
    rate, full_rate = n / max(seconds, 1e-12), n / max(val.seconds, 1e-12)
    r = dict(
        label=label, thresholds=thresholds.tolist(), top1=(prediction == val.targets).sum().item() * 100.0 / n,
        simulated_top1=evaluate_thresholds(val.confidence, val.correct, flops, thresholds)[0], exit_shares=shares,
        expected_gflops=gflops, images_per_second=rate, all_exits_images_per_second=full_rate,
        measured_speedup=rate / full_rate, flops_speedup=float(flops[-1]) / gflops,
        exits_differing_from_simulation=int((exit_index != simulated).sum()),
        predictions_differing_from_simulation=int((prediction != simulated_prediction).sum()))
    print(f"early_exit {label} : top-1 {r['top1']:.2f}% (simulated {r['simulated_top1']:.2f}%), "
          f"exit shares {fmt_list(shares, 3)}, {gflops:.4g} GFLOPs/image, {rate:.1f} images/s vs "
          f"{full_rate:.1f} images/s running all exits ({r['measured_speedup']:.2f}x measured, "
          f"{r['flops_speedup']:.2f}x by FLOPs; model time only), "
          f"{n - r['exits_differing_from_simulation']}/{n} exits and "
          f"{n - r['predictions_differing_from_simulation']}/{n} predictions as simulated")
    return r


# ---------------------------------------------------------------------------- main

def check_predict_args(args: argparse.Namespace) -> None:
    """Options of --predict, before anything is loaded."""
    for flag, given in (("--early_exit", args.early_exit), ("--save_checkpoint", args.save_checkpoint)):
        if given:
            raise UsageError(f"{flag} is for evaluation; it does not go with --predict")
    for flag, values in (("--budget", args.budget), ("--budget_index", args.budget_index)):
        if len(values) > 1:
            raise UsageError(f"--predict takes one {flag}, got {len(values)}")
        if values and args.thresholds is not None:
            note(f"{flag} is not used: --thresholds comes first")
    if args.budget and args.budget_index:
        note("--budget_index is not used: --budget comes first")
    for flag, value, low in (("--batch_size", args.batch_size, 1), ("--workers", args.workers, 0),
                             ("--topk", args.topk, 0)):
        if value < low:
            raise UsageError(f"{flag} must be at least {low}, got {value}")
    if args.model is not None and not is_cascade_name(args.model):
        raise UsageError(f"unknown model {args.model!r}; choose one of: {', '.join(MODEL_CFGS)}, "
                         "or a timm model (single-exit baseline)")
    output_format(args.output)


def predict_images(args: argparse.Namespace) -> None:
    """--predict: one row per image to --output (or stdout), notes and the summary to stderr."""
    check_predict_args(args)
    sources = check_sources(args.predict)
    device = resolve_device(args.device)
    clf = DVTClassifier.from_checkpoint(
        args.checkpoint_path, model=args.model, budget=args.budget[0] if args.budget else None,
        budget_index=args.budget_index[0] if args.budget_index else None, thresholds=args.thresholds,
        device=device, amp=resolve_amp(args.amp, device), class_names=args.class_names,
        label_type=args.label_type, img_size=args.img_size)
    net = clf.model
    names = ("from " + args.class_names if args.class_names else "the checkpoint's" if
             net.pretrained_cfg.get("label_names") else "ImageNet's (timm)" if clf.to_label else "none")
    note(f"{net.model_name}: {net.num_exits} exits at {fmt_list(clf.flops)} GFLOPs, {net.img_size} px, {net.num_classes} "
         f"classes (names: {names}); on {device}" + (f", autocast {clf.amp_dtype}" if clf.amp_dtype else ""))
    note(clf.choice.describe())
    summary = PredictionSummary(clf.num_exits)
    topk = min(args.topk, net.num_classes)
    with PredictionWriter(args.output, topk) as writer, \
            tqdm(unit="img", desc="predict", disable=args.no_progress, leave=False, file=sys.stderr) as bar:
        for rows in clf.predict_batches(sources, args.batch_size, args.workers, topk):
            writer.write_many(rows)
            summary.add(rows)
            bar.update(len(rows))
    note(summary.line(clf.choice.budget, clf.choice.expected_gflops))
    if args.output:
        note(f"wrote {args.output}")


def evaluate(args: argparse.Namespace) -> None:
    """The body of the command; raises the errors :func:`main` turns into messages."""
    if args.predict is not None:
        predict_images(args)
        return
    check_args(args)
    check_outputs(args)
    path = args.checkpoint_path
    checkpoint = load_checkpoint_file(path)
    report: dict[str, Any] = {"settings": dict(vars(args))}
    if args.eval_mode == 0:
        show_stored(args, checkpoint, report)
        return

    if args.eval_mode == 1:
        require_entries(checkpoint, ("dynamic_threshold",), path, "by --eval_mode 1 (or use --eval_mode 2)")
    device = resolve_device(args.device)
    amp_dtype = resolve_amp(args.amp, device)
    model = build_model(args, checkpoint, path)
    num_exits = model.num_exits
    flops, flops_source = exit_costs(model, checkpoint, path)
    for target in args.budget:
        if target < flops[0]:
            raise UsageError(f"--budget {target:g} is below the cost of the first exit ({flops[0]:.4g} GFLOPs), "
                             "which every image has to run")
    thresholds = stored_thresholds(checkpoint, path, num_exits) if args.eval_mode == 1 else None
    budgets = list(DEFAULT_BUDGETS) if thresholds is None else list(range(1, thresholds.shape[0] + 1))
    for p in args.budget_index:
        if p > len(budgets):
            raise UsageError(f"--budget_index {p}: there are only {len(budgets)} budgets")
    model.to(device)

    val_set = build_split(args.data_url, "val", eval_transform(model.img_size))
    check_classes(args, checkpoint, model, val_set, args.eval_mode == 2 or bool(args.budget))
    runner = CompiledCascade(model) if args.compile else model
    calib = None
    if args.eval_mode == 2 or args.budget:
        *calib, report["num_calibration"] = calibrate(args, runner, device, amp_dtype)
    if thresholds is None:  # mode 2: from the calibration set alone, so known before val runs
        shares = torch.stack([budget_exit_shares(p, num_exits) for p in budgets])  # (P, E)
        thresholds = find_thresholds(calib[0], shares).cpu()
    found = [thresholds_for_budget(calib[0], calib[1], flops, t) for t in args.budget]
    early_sets: list[tuple[str, torch.Tensor]] = []
    if args.early_exit:
        early_sets += [(f"budget_index {p}", thresholds[p - 1]) for p in args.budget_index]
        early_sets += [(f"budget {t:g} GFLOPs", f.thresholds) for t, f in zip(args.budget, found)]

    note(f"evaluating {len(val_set)} validation images on {device}")
    val = run_validation(runner, make_loader(val_set, args, device, args.seed), device, amp_dtype,
                         [t for _, t in early_sets], not args.no_progress)
    _, curve = budget_curve(val.confidence, val.correct, flops, thresholds=thresholds)
    anytime = anytime_accuracy(val.correct)
    print_results(flops, anytime, curve)
    budget_results = [budget_report(t, f, val, flops) for t, f in zip(args.budget, found)]
    early_results = [early_exit_report(label, t, run, val, flops) for (label, t), run in zip(early_sets, val.early)]

    report.update(
        model_name=model.model_name, model_kwargs=dict(model.model_kwargs), device=str(device),
        amp_dtype=None if amp_dtype is None else str(amp_dtype), img_size=model.img_size,
        num_classes=model.num_classes, torch_version=torch.__version__, num_validation=len(val.targets),
        flops=flops, flops_source=flops_source, anytime_classification=anytime, budgets=budgets,
        dynamic_threshold=thresholds.tolist(), budgeted_batch_classification=curve,
        all_exits_images_per_second=len(val.targets) / max(val.seconds, 1e-12), budget_results=budget_results,
        early_exit=early_results)
    if args.output:
        points = [OperatingPoint(f"budget {r['target_gflops']:g} GFLOPs", r["val_gflops"], r["val_top1"])
                  for r in budget_results]
        save_outputs(args, report, flops, anytime, curve, points)
    if args.save_checkpoint:
        updated = dict(checkpoint)
        updated.update(flops=flops, anytime_classification=anytime, dynamic_threshold=thresholds.clone(),
                       budgeted_batch_classification=curve, model_name=model.model_name,
                       model_kwargs=dict(model.model_kwargs))
        atomic_save(updated, args.save_checkpoint)
        note(f"saved {args.save_checkpoint}")


def save_outputs(args: argparse.Namespace, report: dict, flops: Sequence[float], anytime: Sequence[float],
                 curve: Sequence[Sequence[float]], points: Sequence[OperatingPoint]) -> None:
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    write_json(report, out / RESULTS_JSON)
    name = report.get("model_name") or "DVT"
    plot_accuracy_vs_gflops(out / PLOT_FILE, curve[0], curve[1], flops, anytime, label=name,
                            title=f"{name}: accuracy against average cost", points=points)
    note(f"wrote {out / RESULTS_JSON} and {out / PLOT_FILE}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command with ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    Expected mistakes (bad options, checkpoint or data) give one line on stderr and status 1;
    bad command-line syntax gives argparse's message and status 2.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    out_of_memory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    previous = signal.signal(signal.SIGINT, CTRL_C)
    CTRL_C.pid = os.getpid()
    try:
        evaluate(args)
    except out_of_memory:
        print(f"error: out of memory at --batch_size {args.batch_size}; try a smaller one", file=sys.stderr)
        return 1
    except (CheckpointError, DataError, ValueError, OSError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

import torch
from tqdm.auto import tqdm

from models import DVT, build_dvt, model_from_checkpoint
from models.registry import MODEL_CFGS
from utils.budget import (
    DEFAULT_BUDGETS, BudgetThresholds, ExitStatsAccumulator, anytime_accuracy, budget_curve, budget_exit_shares,
    evaluate_thresholds, exit_assignment, find_thresholds, thresholds_for_budget,
)
from utils.checkpoint import CheckpointError, atomic_save, extract_state_dict, load_checkpoint_file, load_weights
from utils.data import DataError, build_split, calibration_transform, eval_transform, seeded_subset
from utils.engine import head_classes
from utils.evaluate import autocast_context, collect_exit_stats
from utils.flops import exit_gflops
from utils.plots import OperatingPoint, plot_accuracy_vs_gflops

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
                           f"one of {', '.join(MODEL_CFGS)}")
    orig.add_argument("--checkpoint_path", required=True, type=str, help="checkpoint file")
    orig.add_argument("--eval_mode", default=2, type=int, choices=(0, 1, 2),
                      help="0: print the checkpoint's stored results; 1: evaluate val with the stored "
                           "thresholds; 2: find thresholds on training images, evaluate val (default: 2)")
    run = parser.add_argument_group("running")
    run.add_argument("--device", default=None, type=str,
                     help="torch device (default: cuda if available, else cpu)")
    run.add_argument("--workers", default=min(8, os.cpu_count() or 1), type=int,
                     help="data loading processes (default: min(8, cores))")
    run.add_argument("--amp", nargs="?", const="bf16", default=None, choices=tuple(AMP_DTYPES),
                     help="autocast; bare --amp means bf16 (fp16 needs CUDA)")
    run.add_argument("--img_size", default=None, type=int,
                     help="input resolution (default: the checkpoint's, else 224)")
    run.add_argument("--num_classes", default=None, type=int,
                     help="classes of the heads (default: the checkpoint heads' size)")
    run.add_argument("--no_progress", action="store_true", help="no progress bars")
    calib = parser.add_argument_group("calibration (mode 2 and --budget)")
    calib.add_argument("--calib_size", default=50000, type=int,
                       help="random training images used to find thresholds (default: 50000)")
    calib.add_argument("--calib_transform", default="train", choices=("train", "eval"),
                       help="augmentation of the calibration images: 'train' (random crop and flip, as "
                            "the original) or 'eval' (resize and center crop) (default: train)")
    calib.add_argument("--seed", default=0, type=int, help="seed of the calibration subset and augmentation")
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
    return parser


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
    if args.model is not None and args.model not in MODEL_CFGS:
        raise UsageError(f"unknown model {args.model!r}; choose one of: {', '.join(MODEL_CFGS)}")
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
    if amp is None:
        return None
    if amp == "fp16" and device.type != "cuda":
        raise UsageError("--amp fp16 needs a CUDA device; use --amp bf16 on the CPU")
    return AMP_DTYPES[amp]


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


def model_name_for(args: argparse.Namespace, checkpoint: dict, path: str) -> str:
    """The model to build: the checkpoint's own name, which ``--model`` must agree with."""
    stored = checkpoint.get("model_name")
    if stored is not None and args.model is not None and stored != args.model:
        raise CheckpointError(
            f"{path} holds a {stored} checkpoint, but --model is {args.model}; drop --model or pass --model {stored}")
    name = stored or args.model or DEFAULT_MODEL
    if name not in MODEL_CFGS:
        raise CheckpointError(f"{path} names an unknown model {name!r}; known: {', '.join(MODEL_CFGS)}")
    return name


def build_model(args: argparse.Namespace, checkpoint: dict, path: str) -> DVT:
    """The checkpoint's model with its weights loaded, on the CPU."""
    name = model_name_for(args, checkpoint, path)
    state_dict = extract_state_dict(checkpoint, path)
    overrides = {}
    if args.img_size is not None:
        overrides["img_size"] = args.img_size
    if args.num_classes is not None:
        overrides["num_classes"] = args.num_classes
    if "model_name" in checkpoint:
        model = model_from_checkpoint(checkpoint, name, **overrides)
    else:
        # released files carry weights only: the heads tell the number of classes
        overrides.setdefault("num_classes", head_classes(state_dict) or 1000)
        overrides.setdefault("img_size", 224)
        model = build_dvt(name, **overrides)
    load_weights(model, state_dict)
    return model.eval()


# ----------------------------------------------------------------------------- data

def make_loader(dataset, args: argparse.Namespace, device: torch.device, seed: int) -> torch.utils.data.DataLoader:
    """In-order loader; ``seed`` fixes the workers' random augmentation."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(seed))


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


def one_line(error: BaseException) -> str:
    """The meaningful line of an error. Errors raised in DataLoader workers come back with the
    worker's whole traceback in the message; keep its last line, without the type name."""
    text = str(error).strip()
    if "Traceback (most recent call last)" in text:
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        head, sep, rest = last.partition(": ")
        text = rest if sep and " " not in head else last
    lines = text.splitlines()
    return lines[0] if lines else type(error).__name__


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
        model_name_for(args, checkpoint, path)
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
        note(f"the checkpoint has no 'flops'; counted with utils.flops.exit_gflops: {fmt_list(flops)}")
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
    calib_set = seeded_subset(build_split(args.data_url, "train", transform), args.calib_size, args.seed)
    note(f"calibration: {len(calib_set)} training images ({args.calib_transform} transform, seed {args.seed})")
    torch.manual_seed(args.seed)  # without workers the augmentation draws from the global generator
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

def evaluate(args: argparse.Namespace) -> None:
    """The body of the command; raises the errors :func:`main` turns into messages."""
    check_args(args)
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
    calib = None
    if args.eval_mode == 2 or args.budget:
        *calib, report["num_calibration"] = calibrate(args, model, device, amp_dtype)
    if thresholds is None:  # mode 2: from the calibration set alone, so known before val runs
        shares = torch.stack([budget_exit_shares(p, num_exits) for p in budgets])  # (P, E)
        thresholds = find_thresholds(calib[0], shares).cpu()
    found = [thresholds_for_budget(calib[0], calib[1], flops, t) for t in args.budget]
    early_sets: list[tuple[str, torch.Tensor]] = []
    if args.early_exit:
        early_sets += [(f"budget_index {p}", thresholds[p - 1]) for p in args.budget_index]
        early_sets += [(f"budget {t:g} GFLOPs", f.thresholds) for t, f in zip(args.budget, found)]

    note(f"evaluating {len(val_set)} validation images on {device}")
    val = run_validation(model, make_loader(val_set, args, device, args.seed), device, amp_dtype,
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
    return 0


if __name__ == "__main__":
    sys.exit(main())

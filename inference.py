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

The options and their checks are in :mod:`utils.run.inference_options`; the steps below call
:mod:`utils.budget` (the evaluation loop, threshold search, reports) and :mod:`utils.predict`.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any, NamedTuple, Optional, Sequence

import torch

from models import DVT
from models.deploy import CompiledCascade
from utils.budget.choice import as_plain, stored_thresholds
from utils.budget.flops import exit_costs
from utils.budget.report import budget_report, early_exit_report, fmt_list, print_results, save_outputs
from utils.budget.sharded import sharded_exit_stats, sharded_validation_run
from utils.budget.stats import ValRun, anytime_accuracy
from utils.budget.thresholds import DEFAULT_BUDGETS, budget_curve, find_budget_thresholds, thresholds_for_budget
from utils.checkpoint.files import load_checkpoint_file
from utils.checkpoint.release import RESULT_KEYS, require_entries, save_with_results
from utils.checkpoint.weights import build_from_checkpoint, checkpoint_model_name
from utils.data.build import read_split, split_classes
from utils.data.classes import check_checkpoint_classes, check_split_classes, label_by_number, label_numbered_folders
from utils.data.loader import BatchShardSampler, calibration_subset, close_loaders, make_loader
from utils.data.scan import left_out_line
from utils.data.transforms import calibration_transform, eval_transform
from utils.errors import CheckpointError, ConfigError, DataError, one_line
from utils.precision import resolve_precision
from utils.predict.classifier import DVTClassifier
from utils.predict.job import PredictOptions, predict_files
from utils.predict.output import PredictionSummary, output_format
from utils.predict.resume import refuse_existing
from utils.predict.sources import IMAGE_SUFFIXES, check_sources, files_left_out
from utils.run.allocator import allocator_choice, keep_freed_memory
from utils.run.distributed import DistEnv, cleanup_distributed, join_launcher, launcher_rank, on_rank_zero
from utils.run.inference_options import (
    DEFAULT_MODEL,
    build_parser,
    check_args,
    check_model_name,
    check_runtime_args,
    require_checkpoint,
)
from utils.run.preflight import check_output_folder, check_writable_file
from utils.run.progress import bars_cleared_on_error
from utils.run.signals import CTRL_C


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command with ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    Expected mistakes (bad options, checkpoint or data) give one line on stderr and status 1;
    bad command-line syntax gives argparse's message and status 2, and so does an unknown
    --model (one line), as in main.py.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        require_checkpoint(parser, args)
        check_model_name(args.model)
        allocator_choice()  # a mistyped DVT_MALLOC is refused here
    except SystemExit as e:
        return int(e.code or 0)
    except ConfigError as e:
        if os.environ.get("RANK", "0") == "0":  # every process refuses the same option
            print(f"error: {e}", file=sys.stderr)
        return 2
    keep_freed_memory()  # large CPU batches without page faults (utils/run/allocator.py)
    out_of_memory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    previous = signal.signal(signal.SIGINT, CTRL_C)
    CTRL_C.pid = os.getpid()
    try:
        with bars_cleared_on_error():
            evaluate(args)
    except out_of_memory:
        print(f"error: {rank_prefix()}out of memory at --batch_size {args.batch_size}; try a smaller one",
              file=sys.stderr)
        return 1
    except (CheckpointError, DataError, ValueError, OSError) as e:
        if launcher_rank() == 0 or not isinstance(e, ConfigError):  # every process refuses the same options
            print(f"error: {rank_prefix()}{one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)
        close_loaders()
        cleanup_distributed()
    return 0


def rank_prefix() -> str:
    """``rank N: `` before the error line of a process other than the first, else nothing."""
    return f"rank {launcher_rank()}: " if launcher_rank() else ""


def evaluate(args: argparse.Namespace) -> None:
    """The body of the command; raises the errors :func:`main` turns into messages."""
    args.no_progress = args.no_progress or launcher_rank() > 0  # one process shows progress, as it alone prints
    if args.predict is not None:
        predict_images(args)
        return
    check_args(args)
    if args.eval_mode == 0:  # runs nothing: the first process alone prints
        if launcher_rank() == 0:
            check_outputs(args)
            show_stored(args, load_checkpoint_file(args.checkpoint_path), {"settings": dict(vars(args))})
        return
    env = join_launcher(args.device)
    on_rank_zero(lambda: check_outputs(args))
    checkpoint = load_checkpoint_file(args.checkpoint_path)
    evaluate_model(args, env, checkpoint, {"settings": dict(vars(args))})


# ------------------------------------------------------------------------- mode 0

def show_stored(args: argparse.Namespace, checkpoint: dict, report: dict) -> None:
    """Mode 0: the checkpoint's own numbers, exactly as stored (as plain Python numbers)."""
    path = args.checkpoint_path
    require_entries(checkpoint, RESULT_KEYS, path, "by --eval_mode 0")
    if args.model is not None:
        checkpoint_model_name(checkpoint, path, args.model, DEFAULT_MODEL)
    flops, anytime, curve = (as_plain(checkpoint[k]) for k in RESULT_KEYS)
    print_results(flops, anytime, curve)
    if args.output:
        report.update(flops=flops, anytime_classification=anytime, budgeted_batch_classification=curve,
                      dynamic_threshold=as_plain(checkpoint.get("dynamic_threshold")),
                      model_name=checkpoint.get("model_name", args.model))
        write_outputs(args, report)


# -------------------------------------------------------------------- modes 1 and 2

class Setup(NamedTuple):
    """What modes 1 and 2 run with: the model (and ``runner``, the model or its compiled
    stand-in), the processes and where this one runs, its exit costs, the stored thresholds
    (mode 1; None in mode 2), the budget indices of the thresholds' rows and the validation set."""
    model: DVT
    runner: Any
    env: DistEnv
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    flops: list[float]
    flops_source: str
    thresholds: Optional[torch.Tensor]
    budgets: list[int]
    val_set: Any


def evaluate_model(args: argparse.Namespace, env: DistEnv, checkpoint: dict, report: dict) -> None:
    """Modes 1 and 2: the thresholds of every budget (stored, or found on the calibration set)
    and of every --budget, one validation run (with the adaptive runs of --early_exit), the
    results printed, then --output and --save_checkpoint. Under a launcher each process runs its
    share of the images, and the first one prints and writes what one process would."""
    setup = prepare(args, env, checkpoint)
    calib = None
    if args.eval_mode == 2 or args.budget:
        *calib, report["num_calibration"] = calibrate(args, setup)
    thresholds = setup.thresholds
    if thresholds is None:  # mode 2: from the calibration set alone, so known before val runs
        thresholds = find_budget_thresholds(calib[0], setup.budgets).cpu()
    found = [thresholds_for_budget(calib[0], calib[1], setup.flops, t) for t in args.budget]
    early_sets: list[tuple[str, torch.Tensor]] = []
    if args.early_exit:
        report["early_exit_queued"] = not args.early_exit_per_batch
        early_sets += [(f"budget_index {p}", thresholds[p - 1]) for p in args.budget_index]
        early_sets += [(f"budget {t:g} GFLOPs", f.thresholds) for t, f in zip(args.budget, found)]

    note(f"evaluating {len(setup.val_set)} validation images on {processes(env)}")
    val = sharded_validation_run(setup.runner, loader(args, setup.val_set, env), setup.model.num_exits, env,
                                 setup.amp_dtype, [t for _, t in early_sets], not args.no_progress,
                                 queued=not args.early_exit_per_batch)
    _, curve = budget_curve(val.confidence, val.correct, setup.flops, thresholds=thresholds)
    anytime = anytime_accuracy(val.correct)
    if not env.is_main:
        return
    print_results(setup.flops, anytime, curve)
    budget_results = [budget_report(t, f, val, setup.flops) for t, f in zip(args.budget, found)]
    early_results = [early_exit_report(label, t, run, val, setup.flops)
                     for (label, t), run in zip(early_sets, val.early)]

    record(report, setup, val, anytime, thresholds, curve, budget_results, early_results)
    if args.output:
        write_outputs(args, report)
    if args.save_checkpoint:
        save_with_results(checkpoint, args.save_checkpoint, setup.model, setup.flops, anytime, thresholds, curve)
        note(f"saved {args.save_checkpoint}")


def prepare(args: argparse.Namespace, env: DistEnv, checkpoint: dict) -> Setup:
    """Everything that can be checked before a slow step: the model with its weights, its exit
    costs, the stored thresholds, the budgets asked for and the validation classes."""
    path = args.checkpoint_path
    if args.eval_mode == 1:
        require_entries(checkpoint, ("dynamic_threshold",), path, "by --eval_mode 1 (or use --eval_mode 2)")
    amp_dtype = resolve_amp(args.amp, env.device)
    overrides = {k: v for k, v in (("img_size", args.img_size), ("num_classes", args.num_classes)) if v is not None}
    model, _ = build_from_checkpoint(checkpoint, path, name=args.model, default_name=DEFAULT_MODEL, **overrides)
    flops, flops_source = exit_costs(model, checkpoint, path)
    if flops_source == "counted":
        note(f"the checkpoint has no 'flops'; counted with utils.budget.flops.exit_gflops: {fmt_list(flops)}")
    for target in args.budget:
        if target < flops[0]:
            raise ConfigError(f"--budget {target:g} is below the cost of the first exit ({flops[0]:.4g} GFLOPs), "
                              "which every image has to run")
    thresholds = stored_thresholds(checkpoint, model.num_exits, path, torch.float32) if args.eval_mode == 1 else None
    budgets = list(DEFAULT_BUDGETS) if thresholds is None else list(range(1, thresholds.shape[0] + 1))
    for p in args.budget_index:
        if p > len(budgets):
            raise ConfigError(f"--budget_index {p}: there are only {len(budgets)} budgets")
    model.to(env.device)
    val_set = on_rank_zero(lambda: read_split(args.data_url, "val", eval_transform(model.img_size)))
    check_classes(args, checkpoint, model, val_set, args.eval_mode == 2 or bool(args.budget))
    runner = CompiledCascade(model, freeze=True) if args.compile else model  # its weights no longer change
    return Setup(model, runner, env, env.device, amp_dtype, flops, flops_source, thresholds, budgets, val_set)


def calibrate(args: argparse.Namespace, setup: Setup) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Exit statistics on a seeded random subset of the training set: (confidence, correct, size)."""
    size = setup.model.img_size
    transform = calibration_transform(size) if args.calib_transform == "train" else eval_transform(size)
    train_set = on_rank_zero(lambda: read_split(args.data_url, "train", transform))
    if split_classes(args.data_url, "train") is None:  # tar shards: their classes are known once read
        check_split_classes(list(train_set.classes), list(setup.val_set.classes), args.data_url)
    if train_set.class_to_idx != setup.val_set.class_to_idx:  # numbered folders labelled by number (check_classes)
        label_by_number(train_set)
    calib_set = calibration_subset(train_set, args.calib_size, args.seed)
    note(f"calibration: {len(calib_set)} training images ({args.calib_transform} transform, seed {args.seed})")
    confidence, correct = sharded_exit_stats(setup.runner, loader(args, calib_set, setup.env), setup.model.num_exits,
                                             setup.env, setup.amp_dtype, "calibration", not args.no_progress)
    return confidence, correct, len(calib_set)


def loader(args: argparse.Namespace, dataset: Any, env: DistEnv) -> torch.utils.data.DataLoader:
    """This process's batches (all of them when alone), in order, the generator seeded with
    --seed; stops on Ctrl-C with one line."""
    sampler = BatchShardSampler(len(dataset), args.batch_size, env.world_size, env.rank)
    return make_loader(dataset, sampler, args.batch_size, args.workers, persistent=False,
                       pin_memory=env.device.type == "cuda", seed=args.seed, ctrl_c=True)


def processes(env: DistEnv) -> str:
    return f"{env.world_size} processes on {env.device.type} ({env.backend})" if env.distributed \
        else str(env.device)


def record(report: dict, setup: Setup, val: ValRun, anytime: list[float], thresholds: torch.Tensor,
           curve: list[list[float]], budget_results: list[dict], early_results: list[dict]) -> None:
    """Every number and setting of modes 1 and 2, for --output."""
    model = setup.model
    report.update(
        model_name=model.model_name, model_kwargs=dict(model.model_kwargs), device=str(setup.device),
        amp_dtype=None if setup.amp_dtype is None else str(setup.amp_dtype), img_size=model.img_size,
        num_classes=model.num_classes, torch_version=torch.__version__, num_validation=len(val.targets),
        flops=setup.flops, flops_source=setup.flops_source, anytime_classification=anytime, budgets=setup.budgets,
        dynamic_threshold=thresholds.tolist(), budgeted_batch_classification=curve,
        all_exits_images_per_second=len(val.targets) / max(val.seconds, 1e-12), budget_results=budget_results,
        early_exit=early_results)


def write_outputs(args: argparse.Namespace, report: dict) -> None:
    json_path, plot_path = save_outputs(args.output, report)
    note(f"wrote {json_path} and {plot_path}")


def check_outputs(args: argparse.Namespace) -> None:
    """--output and --save_checkpoint can be written, before any slow step."""
    if args.output:
        check_output_folder(args.output, 0, "--output")
    if args.save_checkpoint:
        check_writable_file(args.save_checkpoint, "--save_checkpoint")


def check_classes(args: argparse.Namespace, checkpoint: dict, model: DVT, val_set: Any, calibrates: bool) -> None:
    """The validation classes are the checkpoint's (and the calibration split's), or stop. Class
    folders numbered 0 to N - 1 (ImageNet-V2's layout) that the checkpoint was not trained on by
    those names are the model's classes by number: the images are labelled by their folder's
    number (a folder dataset's text order, 0, 1, 10, 100, ..., would scramble the labels)."""
    names = list(val_set.classes)
    train_names = split_classes(args.data_url, "train") if calibrates else None
    if train_names is not None:
        check_split_classes(train_names, names, args.data_url)
    stored = checkpoint.get("class_names")
    numbered = label_numbered_folders(val_set, stored)
    if numbered:
        stored = None  # the numbers are the model's labels: only their count is checked
        note(numbered)
    warning = check_checkpoint_classes(stored, model.num_classes, names, args.checkpoint_path,
                                       args.allow_class_mismatch)
    if warning:
        note(warning)


# ------------------------------------------------------------------------ --predict

def predict_images(args: argparse.Namespace) -> None:
    """--predict: one row per image to --output (or stdout), notes and the summary to stderr.
    Under a launcher each process classifies its share and the first one writes every row."""
    check_predict_args(args)
    sources = check_sources(args.predict)
    env = join_launcher(args.device)
    on_rank_zero(lambda: refuse_existing(args.output, args.resume, args.overwrite))
    clf, runs_on = predict_classifier(args, env.device)
    net = clf.model
    names = ("from " + args.class_names if args.class_names else "the checkpoint's" if
             net.pretrained_cfg.get("label_names") else "ImageNet's (timm)" if clf.to_label else "none")
    note(f"{net.model_name}: {net.num_exits} exits at {fmt_list(clf.flops)} GFLOPs, {net.img_size} px, "
         f"{net.num_classes} classes (names: {names}); on {processes(env)}{runs_on}")
    note(clf.choice.describe())
    summary = PredictionSummary(clf.num_exits)
    options = PredictOptions(args.output, min(args.topk, net.num_classes), args.batch_size, args.workers, args.resume,
                             not args.no_progress)
    predict_files(clf, sources, env, options, summary)
    note(summary.line(clf.choice.budget, clf.choice.expected_gflops))
    left_out = files_left_out(sources) if launcher_rank() == 0 else None  # one more listing: cheap next to the images
    if left_out:
        note(left_out_line("--predict", left_out, IMAGE_SUFFIXES))
    if args.output:
        note(f"wrote {args.output}")


def predict_classifier(args: argparse.Namespace, device: torch.device) -> tuple[DVTClassifier, str]:
    """The classifier of --predict, PyTorch's from --checkpoint_path or ONNX Runtime's from
    --onnx, and how it runs (for the note)."""
    choice = dict(budget=args.budget[0] if args.budget else None, thresholds=args.thresholds,
                  budget_index=args.budget_index[0] if args.budget_index else None,
                  class_names=args.class_names, label_type=args.label_type, img_size=args.img_size)
    if args.runtime == "onnxruntime":
        providers = args.ort_providers or ([device.type] if args.device else None)
        clf = DVTClassifier.from_onnx(args.onnx, providers=providers, **choice)
        return clf, f", ONNX Runtime ({', '.join(clf.model.providers)}) from {args.onnx}"
    clf = DVTClassifier.from_checkpoint(args.checkpoint_path, model=args.model, device=device,
                                        amp=resolve_amp(args.amp, device), **choice)
    return clf, f", autocast {clf.amp_dtype}" if clf.amp_dtype else ""


# ------------------------------------------------------------------------ arguments

def check_predict_args(args: argparse.Namespace) -> None:
    """Options of --predict, before anything is loaded."""
    for flag, given in (("--early_exit", args.early_exit), ("--early_exit_per_batch", args.early_exit_per_batch),
                        ("--save_checkpoint", args.save_checkpoint)):
        if given:
            raise ConfigError(f"{flag} is for evaluation; it does not go with --predict")
    for flag, values in (("--budget", args.budget), ("--budget_index", args.budget_index)):
        if len(values) > 1:
            raise ConfigError(f"--predict takes one {flag}, got {len(values)}")
        if values and args.thresholds is not None:
            note(f"{flag} is not used: --thresholds comes first")
    if args.budget and args.budget_index:
        note("--budget_index is not used: --budget comes first")
    if args.resume and args.overwrite:
        raise ConfigError("--resume continues the rows written, --overwrite starts over: give one")
    if args.resume and not args.output:
        raise ConfigError("--resume continues an --output file; without one the rows go to stdout")
    for flag, value, low in (("--batch_size", args.batch_size, 1), ("--workers", args.workers, 0),
                             ("--topk", args.topk, 0)):
        if value < low:
            raise ConfigError(f"{flag} must be at least {low}, got {value}")
    check_model_name(args.model)
    check_runtime_args(args)
    output_format(args.output)


def resolve_amp(amp: Optional[str], device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of --amp on ``device`` (utils.precision's rule, shared with main.py)."""
    try:
        precision = resolve_precision(amp, device)
    except ValueError as e:
        raise ConfigError(f"--amp {amp}: {e}") from None
    if precision.warning:
        note(f"warning: {precision.warning}")
    return precision.dtype


def note(message: str) -> None:
    """A line on stderr, from the first process only."""
    if launcher_rank() == 0:
        print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())

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
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
from timm.utils import ApexScaler, NativeScaler
from torch.nn.parallel import DistributedDataParallel

import models  # noqa: F401  (registers the DVT models in timm)
from utils.budget.flops import exit_gflops
from utils.budget.stats import ExitStatsAccumulator
from utils.checkpoint.files import load_checkpoint_file
from utils.checkpoint.release import export_released, model_for_checkpoint
from utils.checkpoint.training import Checkpoints, ResumePoint, require_training_checkpoint, restore_training_state
from utils.checkpoint.weights import checkpoint_weights, load_weights, unwrap_model
from utils.data.build import (
    TrainData,
    calibration_set,
    checked_training_data,
    checkpoint_val_set,
    device_normalize,
    val_batch_size,
)
from utils.data.images import SkipBadImages
from utils.data.loader import ShardSampler, close_loaders, make_loader
from utils.errors import CheckpointError, ConfigError, DataError, one_line
from utils.run.allocator import allocator_choice, keep_freed_memory
from utils.run.config import resolved_config, write_config
from utils.run.distributed import DistEnv, agreed_flags, cleanup_distributed, setup_distributed
from utils.run.folder import BEST, CONFIG_FILE, LAST, RELEASED, claim_run_folder, run_folder
from utils.run.preflight import PreChecked, check_before_run, check_writable_file, training_precision
from utils.run.progress import bars_cleared_on_error
from utils.run.records import CsvSummary, TensorBoardLog, add_file_log, prefixed, remove_logging, setup_logging
from utils.run.signals import Interrupted, StopSignal, signals_raise
from utils.run.train_options import check_args, parse_args
from utils.train.guard import NonFiniteLossError, StepGuard, parse_injections
from utils.train.loop import (
    EpochResult,
    ExitMeter,
    TrainContext,
    TrainingInterrupted,
    dynamic_accuracy,
    evaluate,
    format_metrics,
    train_one_epoch,
    updates_per_epoch,
)
from utils.train.model import initial_model
from utils.train.recipe import (build_ema, build_mixup_and_loss, build_optimizer, build_scheduler, global_batch,
                                scaled_lr)
from utils.train.rng import deterministic_mode

_logger = logging.getLogger("dvt.train")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command with ``argv`` (default ``sys.argv[1:]``); returns the exit status:
    0 done; 1 a data, checkpoint or non-finite-loss error; 2 bad options or config (one line on
    stderr each); 128 + signal number when a signal stopped the run after it saved a resumable
    checkpoint."""
    rank = int(os.environ.get("RANK", "0"))
    try:
        args = parse_args(argv)
        check_args(args)
        allocator_choice()  # a mistyped DVT_MALLOC is refused here
    except SystemExit as e:
        return int(e.code or 0)
    except ConfigError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    keep_freed_memory()  # large CPU batches without page faults (utils/run/allocator.py)
    handlers = setup_logging(rank == 0)
    env = None
    try:
        with deterministic_mode(args.deterministic), bars_cleared_on_error():
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


# ----------------------------------------------------------------------------- training

def train(args: argparse.Namespace, env: DistEnv, stop: StopSignal) -> None:
    """The training run, logged to ``log.txt`` in the run folder as well. Nothing is written
    before the checks pass and the run holds its folder's lock."""
    folder = run_folder(args, env)
    checked = check_before_run(args, folder, env.device)
    # every image listed (and the validation images' sizes read) before the run folder exists:
    # data refused here (an empty class folder, an image too large to decode) leaves no folder behind
    data, class_names = checked_training_data(args, env, stop, checked.class_names)
    folder, lock = claim_run_folder(args, env, folder)
    file_log = None
    try:
        if env.is_main:
            file_log = add_file_log(folder / "log.txt")
        train_in_folder(args, env, stop, folder, checked, data, class_names)
    finally:
        if file_log is not None:
            remove_logging([file_log])
        if lock is not None:
            lock.release()


def train_in_folder(args: argparse.Namespace, env: DistEnv, stop: StopSignal, folder: Path,
                    checked: PreChecked, data: TrainData, class_names: Optional[list[str]]) -> None:
    """The outline of a run: its config, model, recipe and resume point, the epochs, the release."""
    config = resolved_config(args)
    if env.is_main:
        write_config(folder / CONFIG_FILE, config)
    model = initial_model(args, data.num_classes, checked.start_checkpoint).to(env.device)
    model, ctx, point, num_epochs = training_recipe(args, env, stop, config, model, data, checked.resume_checkpoint)
    log_start(args, env, folder, model, data, ctx, num_epochs)
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


def training_recipe(
        args: argparse.Namespace,
        env: DistEnv,
        stop: StopSignal,
        config: dict,
        model: nn.Module,
        data: TrainData,
        resume_checkpoint: Optional[dict],
) -> tuple[nn.Module, TrainContext, ResumePoint, int]:
    """Optimizer, precision, EMA, compilation, schedule, resume, DDP, mixup and loss around
    ``model``: (the model to train, what a step needs, where the run starts, the epochs to run)."""
    amp_dtype, needs_scaler = amp_settings(args, env.device)
    optimizer = build_optimizer(args, model, scaled_lr(args, env.world_size))
    model, optimizer, loss_scaler = mixed_precision(args, env, model, optimizer, needs_scaler)
    model_ema = build_ema(args, model)
    if args.compile:  # after the EMA copy, which stays eager; in place, so parameter names do not change
        model.compile(dynamic=True)
    lr_scheduler, num_epochs = build_scheduler(
        args, optimizer, updates_per_epoch(data.sampler.per_rank // args.batch_size, args.grad_accum_steps))
    point = resume(args, env, config, model, optimizer, model_ema, loss_scaler, lr_scheduler, resume_checkpoint)
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
        guard=StepGuard(env, args.max_bad_steps, parse_injections(args.inject_nonfinite)),
        accum_steps=args.grad_accum_steps)
    return model, ctx, point, num_epochs


def amp_settings(args: argparse.Namespace, device: torch.device) -> tuple[Optional[torch.dtype], bool]:
    """(autocast dtype or None, whether a GradScaler is needed), by the rule of utils.precision."""
    precision = training_precision(args, device)
    if precision.warning:
        _logger.warning(f"warning: {precision.warning}")
    return precision.dtype, precision.needs_scaler


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
        require_training_checkpoint(checkpoint, args.resume)
        point = restore_training_state(checkpoint, env, model, None if args.no_resume_opt else optimizer,
                                       model_ema, loss_scaler, lr_scheduler)
        changed = [k for k in ("model", "batch_size", "grad_accum_steps", "seed", "img_size", "dataset", "mixup",
                               "cutmix", "lr")
                   if checkpoint.get("config", {}).get(k, {"grad_accum_steps": 1}.get(k, config[k])) != config[k]]
        if changed:
            _logger.warning(f"resuming with settings that differ from the checkpoint's: {', '.join(changed)}")
        _logger.info(f"resumed {args.resume}: epoch {point.epoch}, step {point.step}, {point.num_updates} updates")
    if args.start_epoch is not None:
        point.epoch, point.step = args.start_epoch, 0
    return point


def _accumulation(args: argparse.Namespace, env: DistEnv) -> str:
    """`` x N accumulated (G per update)`` of the header line, or nothing without accumulation."""
    if args.grad_accum_steps == 1:
        return ""
    return f" x {args.grad_accum_steps} accumulated ({global_batch(args, env.world_size)} per update)"


def log_start(args: argparse.Namespace, env: DistEnv, folder: Path, model: nn.Module, data: TrainData,
              ctx: TrainContext, num_epochs: int) -> None:
    """One line naming what is about to run, and where."""
    plain = unwrap_model(model)
    n_params = sum(p.numel() for p in plain.parameters())
    cooldown = args.cooldown_epochs > 0 and num_epochs == args.epochs + args.cooldown_epochs
    _logger.info(
        f"{args.model}: {n_params / 1e6:.2f}M parameters, {plain.num_exits} exits, "
        f"{data.num_classes} classes, {args.img_size}px | {env.world_size} process(es) on {env.device.type}"
        f"{' (' + env.backend + ')' if env.backend else ''} | batch {args.batch_size} x {env.world_size}"
        f"{_accumulation(args, env)}, "
        f"lr {scaled_lr(args, env.world_size):.3g}, {args.opt}, epochs {num_epochs}"
        f"{f' ({args.epochs} + {args.cooldown_epochs} cooldown)' if cooldown else ''} | precision "
        f"{'apex O1' if args.apex_amp else ctx.amp_dtype or 'float32'} | EMA {'on' if ctx.model_ema else 'off'} | "
        f"{len(data.train_set)} training / {len(data.val_set)} validation images | run folder {folder}")


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
        self.tensorboard = TensorBoardLog(folder, point.epoch) if args.tensorboard and env.is_main else None
        monitor = args.tensorboard and self.num_exits > 1
        self.flops = exit_gflops(self.plain, self.plain.img_size) if monitor else None
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
        stats = ExitStatsAccumulator() if self.flops else None  # for the dynamic top-1 in TensorBoard
        eval_metrics = evaluate(self.plain, self.data.val_loader, env, ctx.amp_dtype, ctx.progress, stats=stats)
        _logger.info(f"val {epoch}: {format_metrics(eval_metrics, self.num_exits)}")
        score_metrics = eval_metrics
        row = {"epoch": epoch, "lr": result.metrics["lr"], **prefixed("train_", result.metrics),
               "train_img_per_s": result.images_per_second, "train_skipped_steps": result.skipped_steps,
               "train_bad_images": result.bad_images, **prefixed("eval_", eval_metrics)}
        if stats is not None:
            row.update(prefixed("eval_", dynamic_accuracy(stats, self.flops)))
        if self.evaluate_ema:
            ema_metrics = evaluate(ctx.model_ema.module, self.data.val_loader, env, ctx.amp_dtype, ctx.progress,
                                   "val (EMA)")
            _logger.info(f"val {epoch} (EMA): {format_metrics(ema_metrics, self.num_exits)}")
            row.update(prefixed("ema_eval_", ema_metrics))
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
            if self.tensorboard is not None:
                self.tensorboard.write(row)
        _logger.info(f"epoch {epoch}: {args.eval_metric} {score:.4f} (best {point.best_metric:.4f} at epoch "
                     f"{point.best_epoch}), {result.images_per_second:.1f} img/s training, saved {self.folder / LAST}")

    def release(self) -> None:
        """released.pth.tar from the best checkpoint's weights (EMA or model, --release-weights)."""
        args, folder, point = self.args, self.folder, self.point
        if self.tensorboard is not None:
            self.tensorboard.close()
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
                        folder / RELEASED, val_batch_size(args), args.workers, self.ctx.progress,
                        extra={"weights": which, "best_epoch": point.best_epoch, "config": self.config,
                               "class_names": self.class_names})
        _logger.info(f"wrote {folder / RELEASED} ({which} weights of epoch {point.best_epoch})")


# ------------------------------------------------------------------- export and evaluation

def export_only(args: argparse.Namespace, env: DistEnv) -> None:
    """--export-released CKPT: the released file of any checkpoint."""
    path = Path(args.export_released)
    checkpoint = load_checkpoint_file(path)
    out = Path(args.released_path) if args.released_path else path.with_name(RELEASED)
    if out.resolve() == path.resolve():
        raise ConfigError(f"--export-released would overwrite {path}; pass --released-path")
    check_writable_file(out, "--released-path")
    model, which = model_for_checkpoint(args, checkpoint, str(path), env.device)
    val_set, names = checkpoint_val_set(args, checkpoint, model, str(path))
    names = checkpoint.get("class_names") or (names if len(names) == model.num_classes else None)
    export_released(model, val_set, calibration_set(args, model.img_size), env, out, val_batch_size(args),
                    args.workers, _progress(args, env),
                    extra={"source_checkpoint": str(path), "weights": which, "class_names": names})
    _logger.info(f"wrote {out}")


def eval_only(args: argparse.Namespace, env: DistEnv) -> None:
    """--eval-checkpoint CKPT: per-exit loss and top-1 on the validation set."""
    checkpoint = load_checkpoint_file(args.eval_checkpoint)
    model, which = model_for_checkpoint(args, checkpoint, args.eval_checkpoint, env.device)
    val_set, _ = checkpoint_val_set(args, checkpoint, model, args.eval_checkpoint)
    amp_dtype, _ = amp_settings(args, env.device)
    loader = make_loader(val_set, ShardSampler(len(val_set), env.world_size, env.rank), val_batch_size(args),
                         args.workers, env)
    m = evaluate(model, loader, env, amp_dtype, _progress(args, env))
    _logger.info(f"{args.eval_checkpoint} ({which} weights): {format_metrics(m, model.num_exits)}")


def _progress(args: argparse.Namespace, env: DistEnv) -> bool:
    """Progress bars: on rank 0, when --progress or (by default) when stdout is a terminal."""
    shown = sys.stdout.isatty() if args.progress is None else args.progress
    return bool(shown and env.is_main)


if __name__ == "__main__":
    sys.exit(main())

"""Training engine for DVT cascades: distributed setup, a reproducible data pipeline, one
epoch of training, per-exit evaluation, resumable checkpoints and the released-format export.

Exact resume. Every random draw of a run is a function of the seed and of where the run is:

* sample ``i`` of epoch ``e`` is augmented with RNGs seeded from (seed, e, i)
  (:class:`SeededDataset`), whichever process or worker loads it;
* the order of epoch ``e`` is a permutation seeded from (seed, e) (:class:`EpochSampler`),
  which can start at any step;
* before training step ``s`` of epoch ``e`` on rank ``r`` the global Python, numpy and torch
  RNGs (dropout, drop path, mixup) are seeded from (seed, r, e, s).

A checkpoint therefore only needs the model, optimizer, scaler, scheduler, EMA and the step
reached (it also keeps every rank's RNG states and partial epoch metrics), and a run resumed
from any step reproduces the uninterrupted run bit for bit under deterministic settings.
"""
from __future__ import annotations

import logging
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import dispatch_clip_grad
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets, transforms
from tqdm.auto import tqdm

from .checkpoint import CheckpointError, atomic_save, unwrap_model
from .data import DataError, IMAGENET_MEAN, IMAGENET_STD
from .evaluate import autocast_context, collect_exit_stats

_logger = logging.getLogger("dvt.train")

# Independent random streams derived from the run's seed.
STREAM_TRAIN_SAMPLES = 0
STREAM_CALIB_SAMPLES = 1
STREAM_ORDER = 2
STREAM_STEP = 3

CHECKPOINT_FORMAT = "dvt-train-1"
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


class ConfigError(ValueError):
    """A configuration that cannot work: unknown key, bad value, options that do not fit together."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT stopped the run after a resumable checkpoint was written."""

    def __init__(self, signum: int, path: Optional[Path]) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum
        self.path = path


# ----------------------------------------------------------------------- distributed

@dataclass
class DistEnv:
    """Where this process runs: rank among ``world_size`` processes, its device and backend."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: Optional[str] = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: Optional[str] = None, backend: Optional[str] = None,
                      local_rank: Optional[int] = None, timeout_minutes: float = 30.) -> DistEnv:
    """Join the process group described by the launcher's environment (torchrun and
    ``torch.distributed.launch`` set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``),
    or run alone when there is none.

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; default CUDA when available. In a
            process group ``"cuda"`` means the GPU of the local rank.
        backend: process-group backend; default NCCL on CUDA, gloo on the CPU.
        local_rank: ``--local-rank`` of the legacy launcher, used when ``LOCAL_RANK`` is unset.
        timeout_minutes: collective timeout.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", local_rank if local_rank is not None else 0))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"bad --device {device!r}: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", local if world_size > 1 else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    env = DistEnv(rank=rank, world_size=world_size, local_rank=local, device=dev)
    if world_size > 1:
        env.backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        dist.init_process_group(env.backend, init_method="env://", rank=rank, world_size=world_size,
                                timeout=timedelta(minutes=timeout_minutes))
    return env


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``"sum"`` or ``"max"``); a no-op outside a process group."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if _active():
        dist.barrier()


# ----------------------------------------------------------------------------- seeds

def derive_seed(*words: int) -> int:
    """A 63-bit seed mixed from non-negative integers: nearby inputs give unrelated streams."""
    state = np.random.SeedSequence([int(w) for w in words]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


def seed_all(seed: int) -> None:
    """Seed the global Python, numpy and torch (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict:
    """This process's global RNG states, in types a ``weights_only`` load accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
    }
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------ data

class SeededDataset(Dataset):
    """A dataset whose random transforms depend only on (seed, stream, epoch, index).

    Items are requested with keys ``(epoch, index)`` (a bare ``index`` means epoch 0), as
    :class:`EpochSampler` yields them. Around each item the global Python, numpy and torch
    CPU generators (which torchvision and timm transforms draw from) are seeded from the
    key and then restored, so the caller's random streams are untouched and the same sample
    gets the same augmentation in any process, worker or resumed run.
    """

    def __init__(self, dataset: Dataset, seed: int, stream: int = STREAM_TRAIN_SAMPLES) -> None:
        self.dataset = dataset
        self.seed = seed
        self.stream = stream

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        seed = derive_seed(self.seed, self.stream, epoch, index)
        saved = random.getstate(), np.random.get_state(), torch.random.default_generator.get_state()
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        torch.random.default_generator.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.random.default_generator.set_state(saved[2])


class EpochSampler(Sampler):
    """This rank's share of one training epoch, as ``(epoch, index)`` keys.

    The order is a permutation seeded from (seed, epoch), dealt round-robin to the ranks
    (padded by wrapping around, as ``DistributedSampler``). With ``repeats > 1`` every index is
    repeated that many times before dealing (DeiT's repeated augmentation: the copies go to
    different ranks) and each rank keeps ``len // world_size`` keys, so an epoch still visits
    about ``len`` samples. ``set_epoch(epoch, start)`` skips the first ``start`` keys, to resume
    in the middle of an epoch.
    """

    def __init__(self, num_samples: int, world_size: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True, repeats: int = 1) -> None:
        if num_samples < 1:
            raise DataError("the training set is empty")
        self.n = num_samples
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.repeats = max(1, repeats)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    @property
    def per_rank(self) -> int:
        """Keys per rank in a whole epoch."""
        if self.repeats > 1:
            return self.n // self.world_size
        return math.ceil(self.n / self.world_size)

    def indices(self) -> list[int]:
        """This rank's indices of the whole epoch."""
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, STREAM_ORDER, self.epoch))
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        if self.repeats > 1:
            order = order.repeat_interleave(self.repeats)
        total = math.ceil(len(order) / self.world_size) * self.world_size
        if total > len(order):
            order = order.repeat(math.ceil(total / len(order)))[:total]
        return order[self.rank::self.world_size][:self.per_rank].tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self.indices()[self.start:]:
            yield self.epoch, index

    def __len__(self) -> int:
        return max(self.per_rank - self.start, 0)


class ShardSampler(Sampler):
    """Indices ``rank, rank + world_size, ...``: every sample exactly once over all ranks
    (no padding, so reduced metrics are exact)."""

    def __init__(self, num_samples: int, world_size: int = 1, rank: int = 0) -> None:
        self.n, self.world_size, self.rank = num_samples, world_size, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGTERM/SIGINT to the training process: a worker killed by the
    signal (Slurm and Ctrl-C signal every process) would make the loader fail before the
    training process could save its checkpoint."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def make_loader(dataset: Dataset, sampler: Sampler, batch_size: int, workers: int, env: DistEnv,
                drop_last: bool = False, persistent: bool = True, pin_memory: Optional[bool] = None) -> DataLoader:
    """A DataLoader that takes nothing from the global RNGs (its own seeded generator).
    Workers persist across epochs: the epoch travels in the sampler's keys."""
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
        pin_memory=env.device.type == "cuda" if pin_memory is None else pin_memory,
        persistent_workers=persistent and workers > 0, generator=torch.Generator().manual_seed(0),
        worker_init_fn=_ignore_stop_signals if workers > 0 else None)


def _without_md5(files: Sequence[tuple[str, Any]]) -> list[tuple[str, None]]:
    return [(name, None) for name, _ in files]


class CIFAR10Files(datasets.CIFAR10):
    """torchvision's CIFAR-10 reader for a copy already on disk, checking that the files are
    there but not their MD5 sums.

    torchvision compares every file with the MD5 of the official archive, so only the official
    bytes load; a re-packed or generated copy in the same format (the tests' fake CIFAR) cannot
    match a chosen MD5. Listing the same files with no checksum keeps torchvision's own parsing;
    a damaged file still fails when it is unpickled. Nothing is ever downloaded.
    """
    train_list = _without_md5(datasets.CIFAR10.train_list)
    test_list = _without_md5(datasets.CIFAR10.test_list)
    meta = {**datasets.CIFAR10.meta, "md5": None}


class CIFAR100Files(datasets.CIFAR100):
    """CIFAR-100 counterpart of :class:`CIFAR10Files` (fine labels)."""
    train_list = _without_md5(datasets.CIFAR100.train_list)
    test_list = _without_md5(datasets.CIFAR100.test_list)
    meta = {**datasets.CIFAR100.meta, "md5": None}


CIFAR_CLASSES = {"cifar10": CIFAR10Files, "cifar100": CIFAR100Files}


def load_cifar(name: str, root: str | os.PathLike, train: bool, transform: Optional[Callable]) -> Dataset:
    """CIFAR-10/100 in torchvision's on-disk format under ``root`` (the folder holding
    ``cifar-10-batches-py`` / ``cifar-100-python``, or that folder itself)."""
    cls = CIFAR_CLASSES[name]
    root = Path(os.path.expanduser(str(root)))
    if not (root / cls.base_folder).is_dir() and root.name == cls.base_folder:
        root = root.parent
    folder = root / cls.base_folder
    if not folder.is_dir():
        raise DataError(f"{name}: no '{cls.base_folder}/' folder in {root} (expected torchvision's "
                        f"python-format {name.upper()}, e.g. extracted from the official archive)")
    names = [n for n, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{name}: {folder} lacks {', '.join(missing)}")
    try:
        return cls(str(root), train=train, transform=transform, download=False)
    except Exception as e:  # unpickling errors of damaged files come in many types
        raise DataError(f"{name}: cannot read {folder}: {type(e).__name__}: {e}") from None


def cifar_train_transform(img_size: int, hflip: float, mean: Sequence[float], std: Sequence[float],
                          auto_augment: Optional[str] = None, re_prob: float = 0., re_mode: str = "pixel",
                          re_count: int = 1) -> transforms.Compose:
    """Resize the 32x32 image to ``img_size`` (bicubic), random crop with ``img_size // 8``
    padding, flip (the T2T-ViT transfer recipe); optional RandAugment and random erasing."""
    from timm.data.auto_augment import rand_augment_transform
    from timm.data.random_erasing import RandomErasing

    ops: list[Callable] = [
        transforms.Resize(img_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomCrop(img_size, padding=img_size // 8),
    ]
    if hflip > 0:
        ops.append(transforms.RandomHorizontalFlip(hflip))
    if auto_augment:
        if not auto_augment.startswith("rand"):
            raise ConfigError(f"--train-crop pad supports RandAugment ('rand-...') only, got --aa {auto_augment}")
        hparams = dict(translate_const=int(img_size * 0.45), img_mean=tuple(round(255 * m) for m in mean))
        ops.append(rand_augment_transform(auto_augment, hparams))
    ops += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    if re_prob > 0:
        ops.append(RandomErasing(re_prob, mode=re_mode, max_count=re_count, device="cpu"))
    return transforms.Compose(ops)


def default_mean_std(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet statistics for image folders, CIFAR statistics for CIFAR (as T2T-ViT's transfer script)."""
    if dataset.startswith("cifar"):
        return CIFAR_MEAN, CIFAR_STD
    return IMAGENET_MEAN, IMAGENET_STD


# ---------------------------------------------------------------------- model weights

def init_head_(head: nn.Module) -> None:
    """The DVT initialisation for a new classifier (truncated normal 0.02, zero bias)."""
    from timm.layers import trunc_normal_

    if isinstance(head, nn.Linear):
        trunc_normal_(head.weight, std=.02)
        nn.init.zeros_(head.bias)


def head_classes(state_dict: dict[str, torch.Tensor]) -> Optional[int]:
    """Output size of the classifier heads of a state dict (any key layout)."""
    for key, value in state_dict.items():
        if key.endswith("head.weight") and value.dim() == 2:
            return int(value.shape[0])
    return None


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


# --------------------------------------------------------------------------- metrics

class ExitMeter:
    """Sums over samples of each exit's loss and top-1 hits, and the last exit's top-5 hits;
    :meth:`metrics` reduces them over all ranks."""

    def __init__(self, num_exits: int, device: torch.device) -> None:
        self.num_exits = num_exits
        self.sums = torch.zeros(2 + 2 * num_exits, dtype=torch.float64, device=device)  # n, loss_k, top1_k, top5

    def update(self, loss_sums: torch.Tensor, top1: torch.Tensor, n: int,
               top5: Optional[torch.Tensor] = None) -> None:
        """Args:
            loss_sums: (E,) summed loss of each exit over the batch.
            top1: (E,) correct predictions of each exit.
            n: samples in the batch.
            top5: last exit's top-5 hits, or None.
        """
        tail = top5.reshape(1) if top5 is not None else loss_sums.new_zeros(1)
        count = loss_sums.new_full((1,), n)
        self.sums += torch.cat([count, loss_sums.detach(), top1, tail]).double()

    def state_dict(self) -> dict:
        return {"sums": self.sums.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.sums.copy_(state["sums"])

    def metrics(self, with_top5: bool = False) -> dict[str, float]:
        """``loss`` (sum over exits of the mean loss), ``exit{k}_loss``, ``exit{k}_top1`` (%),
        ``top1`` (the last exit's) and, when asked, ``top5`` / ``exit{E}_top5``."""
        sums = all_reduce_(self.sums.clone()).tolist()
        E = self.num_exits
        n = max(sums[0], 1.0)
        out: dict[str, float] = {"loss": sum(sums[1:1 + E]) / n}
        for k in range(E):
            out[f"exit{k + 1}_loss"] = sums[1 + k] / n
        for k in range(E):
            out[f"exit{k + 1}_top1"] = 100.0 * sums[1 + E + k] / n
        out["top1"] = out[f"exit{E}_top1"]
        if with_top5:
            out["top5"] = out[f"exit{E}_top5"] = 100.0 * sums[-1] / n
        out["samples"] = sums[0]
        return out


def format_metrics(metrics: dict[str, float], num_exits: int) -> str:
    """``loss 6.1234 | exit1 2.0412 12.50% | exit2 ...``"""
    parts = [f"loss {metrics['loss']:.4f}"]
    for k in range(1, num_exits + 1):
        parts.append(f"exit{k} {metrics[f'exit{k}_loss']:.4f} {metrics[f'exit{k}_top1']:.2f}%")
    if "top5" in metrics:
        parts.append(f"top5 {metrics['top5']:.2f}%")
    return " | ".join(parts)


# -------------------------------------------------------------------------- signals

class StopSignal:
    """Turns SIGTERM and SIGINT into a request to stop at the next step boundary, so the run
    can save a resumable checkpoint.

    Args:
        escalate: a second signal then acts as usual (the process dies at once). Leave it off
            under a launcher: torchrun forwards the signal it receives to the workers, which
            have usually received it already, and kills them itself after its grace period.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, escalate: bool = True) -> None:
        self.escalate = escalate
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.signum is None
        self.signum = self.signum or signum
        if self.escalate:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
        if first:
            again = " (send it again to stop at once)" if self.escalate else ""
            _logger.warning(f"{signal.Signals(signum).name} received: stopping after this step "
                            f"with a resumable checkpoint{again}")

    def __enter__(self) -> "StopSignal":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None


def agreed_flags(env: DistEnv, *flags: bool | torch.Tensor) -> list[bool]:
    """Each flag OR-ed over all ranks (one small all-reduce), so every rank takes the same branch."""
    t = torch.stack([torch.as_tensor(f, dtype=torch.float32, device=env.device).reshape(()) for f in flags])
    return [v > 0 for v in all_reduce_(t, "max").tolist()]


# -------------------------------------------------------------------------- training

@dataclass
class TrainContext:
    """What a training step needs besides the model and the data."""
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    env: DistEnv
    seed: int
    amp_dtype: Optional[torch.dtype] = None
    loss_scaler: Any = None
    clip_grad: Optional[float] = None
    clip_mode: str = "norm"
    model_ema: Any = None
    ema_warmup: bool = False
    mixup_fn: Optional[Callable] = None
    lr_scheduler: Any = None
    log_interval: int = 50
    progress: bool = False
    stop: Optional[StopSignal] = None
    recovery_interval: int = 0
    save_recovery: Optional[Callable[[int, int, "ExitMeter"], None]] = None


@dataclass
class EpochResult:
    """metrics: reduced over ranks; steps_done: steps of the epoch done (all of them unless
    interrupted); meter: this rank's sums (a resumable checkpoint keeps them)."""
    metrics: dict[str, float]
    num_updates: int
    steps_done: int
    interrupted: bool
    images_per_second: float
    meter: ExitMeter


def _lr(optimizer: torch.optim.Optimizer) -> float:
    return max(g["lr"] for g in optimizer.param_groups)


def train_one_epoch(
        model: nn.Module,
        loader: DataLoader,
        ctx: TrainContext,
        epoch: int,
        num_updates: int,
        start_step: int = 0,
        meter: Optional[ExitMeter] = None,
) -> EpochResult:
    """Train one epoch (from ``start_step``); the loss is the sum of the per-exit losses.

    Before each step the global RNGs are seeded from (seed, rank, epoch, step). A NaN or
    infinite loss on any rank raises :class:`NonFiniteLossError` before the update, so the
    weights and the checkpoints stay as they were. A stop request (signal) on any rank ends
    the epoch after the current step on every rank.

    Args:
        model: the (possibly DDP-wrapped) cascade returning a tuple of per-exit logits.
        loader: (images, targets) batches of this epoch from ``start_step`` on.
        ctx: optimizer, loss, precision, EMA, mixup, scheduler and logging settings.
        epoch: epoch index.
        num_updates: optimizer updates done before this call.
        start_step: steps of this epoch already done (resumed runs).
        meter: partial metrics of the steps already done (resumed runs).
    """
    env = ctx.env
    plain = unwrap_model(model)
    num_exits = plain.num_exits
    meter = meter or ExitMeter(num_exits, env.device)
    total_steps = start_step + len(loader)
    model.train()
    step = start_step
    interrupted = False
    samples = 0
    started = time.perf_counter()
    bar = tqdm(total=total_steps, initial=start_step, desc=f"train {epoch}", disable=not ctx.progress,
               leave=False, dynamic_ncols=True)
    for step, (images, targets) in enumerate(loader, start=start_step):
        seed_all(derive_seed(ctx.seed, STREAM_STEP, env.rank, epoch, step))
        images = images.to(env.device, non_blocking=True)
        targets = targets.to(env.device, non_blocking=True)
        if ctx.mixup_fn is not None:
            images, targets = ctx.mixup_fn(images, targets)
            hard = targets.argmax(dim=-1)  # the dominant label of the mixed target
        else:
            hard = targets
        with autocast_context(env.device, ctx.amp_dtype):
            outputs = model(images)
        losses = torch.stack([ctx.loss_fn(out.float(), targets) for out in outputs])  # (E,)
        loss = losses.sum()
        bad, stop = agreed_flags(env, ~torch.isfinite(loss), ctx.stop is not None and ctx.stop.requested)
        if bad:
            raise NonFiniteLossError(
                f"non-finite loss at epoch {epoch}, step {step} (per-exit losses on rank {env.rank}: "
                f"{[round(v, 4) for v in losses.tolist()]})")

        ctx.optimizer.zero_grad(set_to_none=True)
        if ctx.loss_scaler is not None:
            ctx.loss_scaler(loss, ctx.optimizer, clip_grad=ctx.clip_grad, clip_mode=ctx.clip_mode,
                            parameters=model.parameters())
        else:
            loss.backward()
            if ctx.clip_grad is not None:
                dispatch_clip_grad(model.parameters(), ctx.clip_grad, mode=ctx.clip_mode)
            ctx.optimizer.step()
        num_updates += 1
        if ctx.model_ema is not None:
            ctx.model_ema.update(plain, step=num_updates if ctx.ema_warmup else None)
        if ctx.lr_scheduler is not None:
            ctx.lr_scheduler.step_update(num_updates=num_updates)

        batch = images.shape[0]
        with torch.no_grad():
            top1 = torch.stack([(out.argmax(dim=-1) == hard).sum() for out in outputs])
        meter.update(losses.detach() * batch, top1, batch)
        samples += batch * env.world_size
        bar.update(1)
        last = step + 1 == total_steps
        if ctx.log_interval and ((step + 1) % ctx.log_interval == 0 or last or stop):
            m = meter.metrics()
            rate = samples / max(time.perf_counter() - started, 1e-9)
            if env.is_main:
                text = (f"train {epoch} [{step + 1:>5d}/{total_steps}] {format_metrics(m, num_exits)} "
                        f"| lr {_lr(ctx.optimizer):.3e} | {rate:.1f} img/s")
                if ctx.progress:
                    bar.set_postfix_str(f"loss {m['loss']:.3f} {rate:.1f} img/s")
                else:
                    _logger.info(text)
        if stop:
            interrupted = True
            step += 1
            break
        if ctx.recovery_interval and ctx.save_recovery is not None and not last \
                and (step + 1) % ctx.recovery_interval == 0:
            ctx.save_recovery(step + 1, num_updates, meter)
    else:
        step = total_steps
    bar.close()
    elapsed = time.perf_counter() - started
    metrics = meter.metrics()
    metrics["lr"] = _lr(ctx.optimizer)
    rate = samples / elapsed if samples else 0.0
    metrics["img_per_s"] = rate
    return EpochResult(metrics, num_updates, step, interrupted, rate, meter)


@torch.no_grad()
def evaluate(
        model: nn.Module,
        loader: DataLoader,
        env: DistEnv,
        amp_dtype: Optional[torch.dtype] = None,
        progress: bool = False,
        desc: str = "val",
) -> dict[str, float]:
    """Per-exit cross-entropy and top-1 (and the last exit's top-5) over this rank's shard of
    ``loader``, summed over all ranks.

    Args:
        model: the plain cascade (not DDP-wrapped: ranks may hold different numbers of batches).
        loader: (images, targets) batches of a :class:`ShardSampler` shard.
        env: this process's device and rank.
        amp_dtype: autocast dtype, or None.
        progress: show a progress bar.
        desc: its label.
    """
    model.eval()
    num_exits = unwrap_model(model).num_exits
    meter = ExitMeter(num_exits, env.device)
    started = time.perf_counter()
    for images, targets in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        images = images.to(env.device, non_blocking=True)
        targets = targets.to(env.device, non_blocking=True)
        with autocast_context(env.device, amp_dtype):
            outputs = model(images)
        outputs = [out.float() for out in outputs]
        losses = torch.stack([F.cross_entropy(out, targets, reduction="sum") for out in outputs])
        top1 = torch.stack([(out.argmax(dim=-1) == targets).sum() for out in outputs])
        k = min(5, outputs[-1].shape[-1])
        top5 = (outputs[-1].topk(k, dim=-1).indices == targets[:, None]).any(dim=-1).sum()
        meter.update(losses, top1, images.shape[0], top5)
    metrics = meter.metrics(with_top5=True)
    metrics["img_per_s"] = metrics["samples"] / max(time.perf_counter() - started, 1e-9)
    return metrics


# ------------------------------------------------------------------------ checkpoints

def training_checkpoint(
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        epoch: int,
        step: int,
        num_updates: int,
        config: dict,
        per_rank: list[dict],
        model_ema: Any = None,
        loss_scaler: Any = None,
        lr_scheduler: Any = None,
        best_metric: Optional[float] = None,
        best_epoch: Optional[int] = None,
        metrics: Optional[dict] = None,
) -> dict:
    """The whole training state, loadable with ``weights_only=True``.

    ``epoch`` is the epoch to continue and ``step`` the steps of it already done (0 at an
    epoch boundary). ``per_rank`` holds every rank's RNG states and partial epoch metrics.
    ``model``/``model_ema`` are plain state dicts (no DDP prefix); ``model_name`` and
    ``model_kwargs`` rebuild the model from the file alone.
    """
    plain = unwrap_model(model)
    return {
        "format": CHECKPOINT_FORMAT,
        "model_name": getattr(plain, "model_name", None),
        "model_kwargs": dict(getattr(plain, "model_kwargs", {})),
        "model": plain.state_dict(),
        "model_ema": None if model_ema is None else model_ema.module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": None if loss_scaler is None else loss_scaler.state_dict(),
        "scheduler": None if lr_scheduler is None else lr_scheduler.state_dict(),
        "epoch": epoch,
        "step": step,
        "num_updates": num_updates,
        "best_metric": best_metric,
        "best_epoch": best_epoch,
        "metrics": dict(metrics or {}),
        "config": dict(config),
        "world_size": len(per_rank),
        "per_rank": per_rank,
    }


def rank_state(meter: Optional[ExitMeter] = None) -> dict:
    """This rank's part of a checkpoint: RNG states and partial epoch metrics."""
    return {"rng": capture_rng_state(), "meter": None if meter is None else meter.state_dict()}


def save_training_state(path: Path, build: Callable[[list[dict]], dict], env: DistEnv,
                        meter: Optional[ExitMeter] = None, also: Sequence[Path] = ()) -> None:
    """Collect every rank's state, then rank 0 writes the checkpoint atomically to ``path``
    (and to each path of ``also``). Every rank must call this; all return after the write."""
    per_rank = all_gather_objects(rank_state(meter))
    if env.is_main:
        checkpoint = build(per_rank)
        atomic_save(checkpoint, path)
        for extra in also:
            atomic_save(checkpoint, extra)
    barrier()


def is_training_checkpoint(checkpoint: dict) -> bool:
    return checkpoint.get("format") == CHECKPOINT_FORMAT


def checkpoint_weights(checkpoint: dict, which: str = "auto", source: str = "checkpoint") -> tuple[dict, str]:
    """The weights to use from a checkpoint: ``"model"``, ``"ema"`` or ``"auto"`` (the EMA
    weights when a training checkpoint has them, else the model's). Released files and plain
    state dicts have one set of weights."""
    from .checkpoint import extract_state_dict

    if not is_training_checkpoint(checkpoint):
        if which == "ema":
            raise CheckpointError(f"{source} is not a training checkpoint of this project; it has no EMA weights")
        return extract_state_dict(checkpoint, source), "model"
    if which == "ema" or (which == "auto" and checkpoint.get("model_ema") is not None):
        if checkpoint.get("model_ema") is None:
            raise CheckpointError(f"{source} has no EMA weights (the run had --no-model-ema)")
        return dict(checkpoint["model_ema"]), "ema"
    return dict(checkpoint["model"]), "model"


# --------------------------------------------------------------------- released file

def sharded_exit_stats(model: nn.Module, dataset: Dataset, env: DistEnv, batch_size: int, workers: int,
                       amp_dtype: Optional[torch.dtype] = None, progress: bool = False,
                       desc: str = "stats") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample confidence and correctness (E, N) of every exit over ``dataset``, in dataset
    order: each rank runs its shard, rank 0 receives all of them."""
    sampler = ShardSampler(len(dataset), env.world_size, env.rank)
    loader = make_loader(dataset, sampler, batch_size, workers, env, persistent=False)
    if len(sampler):
        conf, correct = collect_exit_stats(model, loader, env.device, amp_dtype, desc=desc, progress=progress)
    else:
        E = unwrap_model(model).num_exits
        conf, correct = torch.empty(E, 0), torch.empty(E, 0, dtype=torch.bool)
    parts = all_gather_objects((conf, correct))
    if len(parts) == 1:
        return conf, correct
    E = conf.shape[0]
    full_conf = torch.empty(E, len(dataset))
    full_correct = torch.empty(E, len(dataset), dtype=torch.bool)
    for r, (c, k) in enumerate(parts):
        full_conf[:, r::env.world_size] = c
        full_correct[:, r::env.world_size] = k
    return full_conf, full_correct


def export_released(
        model: nn.Module,
        val_set: Dataset,
        calib_set: Dataset,
        env: DistEnv,
        path: Path,
        batch_size: int,
        workers: int,
        progress: bool = False,
        extra: Optional[dict] = None,
) -> Optional[dict]:
    """Write the released ``.pth.tar`` layout (see :func:`utils.evaluate.released_checkpoint`):
    per-exit GFLOPs of the model at its image size, top-1 of each exit on ``val_set``,
    thresholds for the 59 budgets fitted on ``calib_set`` and the budget curve on ``val_set``.
    The statistics are computed in float32 whatever the training precision: the thresholds are
    confidences of particular samples, and inference.py evaluates in float32 by default.
    Every rank must call this; rank 0 writes and returns the checkpoint."""
    from .evaluate import released_checkpoint
    from .flops import exit_gflops

    plain = unwrap_model(model)
    val_stats = sharded_exit_stats(plain, val_set, env, batch_size, workers, None, progress, "release: val")
    calib_stats = sharded_exit_stats(plain, calib_set, env, batch_size, workers, None, progress,
                                     "release: calibration")
    checkpoint = None
    if env.is_main:
        flops = exit_gflops(plain, plain.img_size)
        checkpoint = released_checkpoint(plain, flops, val_stats, calib_stats, extra=extra)
        atomic_save(checkpoint, path)
    barrier()
    return checkpoint

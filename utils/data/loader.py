"""Loaders: seeded subsets, the samplers that make a run's data order and augmentation a
function of its seed (see :mod:`utils.train.rng`), and the DataLoader every tool builds."""
from __future__ import annotations

import functools
import math
import random
import signal
import weakref
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import DataError
from ..run.distributed import DistEnv
from ..run.signals import CTRL_C, worker_ignores_signals
from ..train.rng import STREAM_CALIB_SAMPLES, STREAM_ORDER, STREAM_TRAIN_SAMPLES, derive_seed

# The calibration seed main.py's release step and inference.py share by default, so that the
# same weights get the same thresholds from both.
CALIB_SEED = 0


def seeded_subset(dataset: torch.utils.data.Dataset, size: int, seed: int = 0) -> torch.utils.data.Dataset:
    """A random subset of ``size`` samples (all of them if fewer), the same for the same seed."""
    n = len(dataset)
    if size >= n:
        return dataset
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(n, generator=g)[:size].sort().values
    return torch.utils.data.Subset(dataset, index.tolist())


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


def calibration_subset(dataset: Dataset, size: int, seed: int = CALIB_SEED) -> SeededDataset:
    """The images thresholds are fitted on: ``size`` samples of ``dataset`` drawn with ``seed``,
    each augmented with random generators seeded from (seed, its index), so that every tool,
    batch size and number of workers or processes sees the same calibration set."""
    return SeededDataset(seeded_subset(dataset, size, seed), seed, STREAM_CALIB_SAMPLES)


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


class BatchShardSampler(Sampler):
    """This rank's share of the batches a single process would make: the dataset cut into
    consecutive batches of ``batch_size`` (the last may be shorter), batch ``k`` going to rank
    ``k % world_size``. Every batch holds the samples it holds in a one-process run, so the
    numbers computed on it are the same to the last bit; a loader with the same ``batch_size``
    rebuilds exactly these batches."""

    def __init__(self, num_samples: int, batch_size: int, world_size: int = 1, rank: int = 0) -> None:
        self.n, self.batch_size, self.world_size, self.rank = num_samples, batch_size, world_size, rank

    def index(self) -> torch.Tensor:
        """``(n,)`` the dataset positions this rank reads, in its order."""
        first = self.rank * self.batch_size
        if first >= self.n:
            return torch.empty(0, dtype=torch.long)
        starts = torch.arange(first, self.n, self.world_size * self.batch_size)
        index = (starts.view(-1, 1) + torch.arange(self.batch_size).view(1, -1)).flatten()  # (batches * B,)
        return index[index < self.n]

    def __iter__(self) -> Iterator[int]:
        return iter(self.index().tolist())

    def __len__(self) -> int:
        return len(self.index())


# make_loader's loaders that started workers, and their worker-backed iterators: a loader that is
# not persistent holds none of its iterators, and an iterator holds no loader
_OPEN_LOADERS: "weakref.WeakSet[TrackedLoader]" = weakref.WeakSet()
_OPEN_ITERATORS: "weakref.WeakSet" = weakref.WeakSet()


def close_loaders() -> None:
    """Stop the workers of every loader still open. A run that ends by an exception may leave
    a loader's iterator alive until the interpreter exits (a persistent loader holds it; a
    generator's traceback may hold another's), which then terminates the workers with SIGTERM
    and waits for them; the workers ignore SIGTERM (:func:`utils.run.signals.worker_ignores_signals`), so the
    process would never end. Shutting them down here ends them through their own queue; a
    worker that has not ended after that (busy in a sample that never returns, or locked
    before it started) is killed, as nothing it holds is needed any more."""
    for iterator in list(_OPEN_ITERATORS):
        iterator._shutdown_workers()
        for worker in iterator._workers:
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=10)
    for loader in list(_OPEN_LOADERS):
        loader._iterator = None  # a persistent loader starts new workers when iterated again
    _OPEN_ITERATORS.clear()
    _OPEN_LOADERS.clear()


class TrackedLoader(DataLoader):
    """A DataLoader whose worker-backed iterators, persistent or not, :func:`close_loaders` reaches."""

    def _get_iterator(self):
        iterator = super()._get_iterator()
        if self.num_workers > 0:
            _OPEN_ITERATORS.add(iterator)
            _OPEN_LOADERS.add(self)
        return iterator


class QuietCtrlCLoader(TrackedLoader):
    """A DataLoader that starts its workers with Ctrl-C held back (see :class:`utils.run.signals.CtrlC`)."""

    def __iter__(self):
        if self.num_workers == 0:
            return super().__iter__()
        with CTRL_C.holding():
            return super().__iter__()


def make_loader(dataset: Dataset, sampler: Optional[Sampler], batch_size: int, workers: int,
                env: Optional[DistEnv] = None, drop_last: bool = False, persistent: bool = True,
                pin_memory: Optional[bool] = None, collate_fn: Optional[Callable] = None, seed: int = 0,
                ctrl_c: bool = False) -> DataLoader:
    """A DataLoader that takes nothing from the global RNGs (its own generator, seeded with
    ``seed``). With ``persistent``, workers persist across epochs: the epoch travels in the
    sampler's keys. ``sampler``: None for the dataset's order. ``pin_memory``: by default, when
    ``env`` runs on CUDA. ``collate_fn``: see :func:`utils.data.images.loader_collate` (the
    bad-image policy). Workers ignore SIGTERM and SIGINT, or with ``ctrl_c`` (a command that
    stops on Ctrl-C with one line, :data:`utils.run.signals.CTRL_C`) only SIGINT, and start
    with Ctrl-C held back."""
    if pin_memory is None:
        pin_memory = env is not None and env.device.type == "cuda"
    init = functools.partial(worker_ignores_signals, signals=(signal.SIGINT,)) if ctrl_c else worker_ignores_signals
    loader = (QuietCtrlCLoader if ctrl_c else TrackedLoader)(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
        pin_memory=pin_memory, persistent_workers=persistent and workers > 0,
        generator=torch.Generator().manual_seed(seed), worker_init_fn=init if workers > 0 else None,
        collate_fn=collate_fn)
    return loader

"""Reproducible randomness: seeds derived from where a run is, and the global RNG states
saved in checkpoints.

Every random draw of a training run is a function of the seed and of the run's position:

* sample ``i`` of epoch ``e`` is augmented with RNGs seeded from (seed, e, i)
  (:class:`utils.data.loader.SeededDataset`), whichever process or worker loads it;
* the order of epoch ``e`` is a permutation seeded from (seed, e)
  (:class:`utils.data.loader.EpochSampler`), which can start at any step;
* before training step ``s`` of epoch ``e`` on rank ``r`` the global Python, numpy and torch
  RNGs (dropout, drop path, mixup) are seeded from (seed, r, e, s).

A checkpoint therefore only needs the weights, the optimizer state and the step reached (it
also keeps every rank's RNG states), and a run resumed from any step reproduces the
uninterrupted run bit for bit under deterministic kernels (:func:`deterministic_mode`).
"""
from __future__ import annotations

import contextlib
import os
import random
from typing import Iterator

import numpy as np
import torch

# Independent random streams derived from the run's seed.
STREAM_TRAIN_SAMPLES = 0
STREAM_CALIB_SAMPLES = 1
STREAM_ORDER = 2
STREAM_STEP = 3


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


_SDP_BACKENDS = ("flash", "mem_efficient", "cudnn", "math")  # torch.backends.cuda.enable_<name>_sdp


def _sdp_flags() -> dict[str, bool]:
    cuda = torch.backends.cuda
    return {n: getattr(cuda, f"{n}_sdp_enabled")() for n in _SDP_BACKENDS if hasattr(cuda, f"{n}_sdp_enabled")}


def _set_sdp_flags(flags: dict[str, bool]) -> None:
    for name, on in flags.items():
        getattr(torch.backends.cuda, f"enable_{name}_sdp")(on)


@contextlib.contextmanager
def deterministic_mode(enabled: bool) -> Iterator[None]:
    """Deterministic kernels while the block runs when ``enabled`` (else cuDNN autotuning);
    the previous settings come back afterwards.

    Enabled means: ``torch.use_deterministic_algorithms(True)`` without ``warn_only``, so an
    operation that has no deterministic implementation on the device raises instead of
    varying silently; cuDNN in deterministic mode without autotuning;
    ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (deterministic cuBLAS; it only takes effect when set
    before the process's first cuBLAS call, so enter this before any CUDA work); and
    scaled-dot-product attention on the math kernel only, because the backward passes of the
    flash, memory-efficient and cuDNN attention kernels add up partial gradients in an order
    that changes from run to run.
    """
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, _sdp_flags())
    try:
        if enabled:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
            _set_sdp_flags({name: name == "math" for name in saved[4]})
        else:
            torch.backends.cudnn.benchmark = True
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
        _set_sdp_flags(saved[4])

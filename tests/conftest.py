"""Fixtures shared by the test modules (shared constants and helpers are in helpers.py)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import main as train_main
from fake_data import make_image_folder
from helpers import quick_args
from models.dvt import DVT


@pytest.fixture(scope="module")
def image_data(tmp_path_factory) -> Path:
    """3 classes, 24 training and 12 validation images of 40x40 (one folder per test module)."""
    return make_image_folder(tmp_path_factory.mktemp("images") / "data", num_classes=3, train_per_class=8,
                             val_per_class=4)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """3 classes, 24 training and 6 validation images of 32x32, shared by every module: copy it
    before changing it."""
    return make_image_folder(tmp_path_factory.mktemp("small") / "data", num_classes=3, train_per_class=8,
                             val_per_class=2, size=32)


@pytest.fixture(scope="session")
def trained_run(small_data, tmp_path_factory) -> Path:
    """The folder of a finished one-epoch run on ``small_data`` (with released.pth.tar), written
    under umask 027; copy it before changing it."""
    out = tmp_path_factory.mktemp("trained")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    old = os.umask(0o027)
    try:
        assert train_main.main(quick_args(small_data, out)) == 0
    finally:
        os.umask(old)
        torch.set_num_threads(threads)
    return out / "train" / "run"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread: two threads on two shared cores make their small
    matrix products many times slower. Modules opt in with ``pytestmark``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def eval_hooks(monkeypatch) -> dict:
    """``hooks[n]()`` runs on the n-th evaluation forward of any DVT (validation, EMA
    validation, release export), to fault a run at a chosen point."""
    hooks: dict = {}
    evals = [0]
    forward = DVT.forward

    def hooked(self, x):
        out = forward(self, x)
        if not self.training:
            evals[0] += 1
            hook = hooks.pop(evals[0], None)
            if hook is not None:
                hook()
        return out

    monkeypatch.setattr(DVT, "forward", hooked)
    return hooks

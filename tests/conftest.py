"""Fixtures shared by the test modules."""
from pathlib import Path

import pytest
import torch

from fake_data import make_image_folder


@pytest.fixture(scope="module")
def image_data(tmp_path_factory) -> Path:
    """3 classes, 24 training and 12 validation images of 40x40 (one folder per test module)."""
    return make_image_folder(tmp_path_factory.mktemp("images") / "data", num_classes=3, train_per_class=8,
                             val_per_class=4)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread: two threads on two shared cores make their small
    matrix products many times slower. Modules opt in with ``pytestmark``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

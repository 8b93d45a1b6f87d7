"""The training transforms of main.py (its defaults and every recipe in configs/) survive every
augmentation magnitude on the installed Pillow, and posterize keeps its meaning at 0 bits."""
from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

import matplotlib.cbook
import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment

from fake_data import make_fake_cifar, make_image_folder
from helpers import REPO
from utils.data.build import build_datasets
from utils.data.transforms import TIMM_POSTERIZE, augment_ops, guard_posterize, posterize
from utils.run.train_options import check_args, parse_args

CONFIGS = sorted(REPO.glob("configs/*.yaml"))
SIZE = 48  # training resolution of the test transforms: the ops are the same at any size
DRAWS = 300  # full-transform draws per recipe: each op is drawn about 40 times


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """Real photographs (matplotlib's sample data), in colour and grey, at two sizes."""
    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as img:
        photo = img.convert("RGB")
    grey = photo.convert("L").convert("RGB")  # a grey picture as the loader gives it: RGB
    return [photo, grey.resize((97, 131)), photo.crop((100, 100, 300, 260))]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("augment")
    return {"folder": make_image_folder(root / "folder", num_classes=2, train_per_class=1, val_per_class=1),
            "cifar10": make_fake_cifar(root / "cifar10", num_classes=10, train_per_batch=1, test_size=2),
            "cifar100": make_fake_cifar(root / "cifar100", num_classes=100, train_per_batch=1, test_size=2)}


def train_transform(data: dict[str, Path], config: Path | None):
    """The training transform exactly as main.py builds it for a recipe (None: its defaults)."""
    argv = ["--config", str(config)] if config else []
    dataset = parse_args(argv).dataset
    args = parse_args([str(data.get(dataset, data["folder"])), *argv])
    check_args(args)
    train, _, _ = build_datasets(args, SIZE)
    return train.transform


def recipes(data: dict[str, Path]) -> dict[str, object]:
    """Transforms of the defaults and every config, one per distinct augmentation."""
    found: dict[str, object] = {}
    for config in [None, *CONFIGS]:
        transform = train_transform(data, config)
        found.setdefault(repr(transform), transform)
    return found


def upper_magnitude(op: auto_augment.AugmentOp) -> float:
    return op.magnitude_max or auto_augment._LEVEL_DENOM


def test_defaults_and_configs_have_guarded_random_augment(data):
    ops = [op for t in recipes(data).values() for op in augment_ops(t)]
    assert {op.name for op in ops} >= {"PosterizeIncreasing", "SolarizeIncreasing", "Rotate"}  # RandAugment inc1
    assert any(op.magnitude_std > 0 for op in ops)
    assert not [op.name for op in ops if op.aug_fn is TIMM_POSTERIZE]


def test_every_op_at_its_extremes(data, photos):
    """Each op alone, always applied, at magnitude 0 and at its upper bound."""
    for transform in recipes(data).values():
        for op in augment_ops(transform):
            saved = op.prob, op.magnitude, op.magnitude_std
            try:
                for magnitude in (0, upper_magnitude(op)):
                    op.prob, op.magnitude, op.magnitude_std = 1.0, magnitude, 0
                    for img in photos:
                        out = op(img)
                        assert out.size == img.size and out.mode == img.mode, op.name
            finally:
                op.prob, op.magnitude, op.magnitude_std = saved


def test_whole_transforms_at_the_top_magnitude(data, photos):
    """The full training transform, every op at its upper magnitude with the recipe's own
    magnitude noise, many draws: every op is drawn and posterize reaches 0 bits."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    for name, transform in recipes(data).items():
        ops = list(augment_ops(transform))
        calls: dict[str, list[tuple]] = defaultdict(list)
        for op in ops:
            op.magnitude = upper_magnitude(op)
            op.aug_fn = _recording(op.aug_fn, calls[op.name])
        for i in range(DRAWS):
            x = transform(photos[i % len(photos)])
            assert x.shape == (3, SIZE, SIZE) and torch.isfinite(x).all()
        assert {op.name for op in ops} <= {n for n, c in calls.items() if c}, name
        if "PosterizeIncreasing" in calls:
            assert (0,) in calls["PosterizeIncreasing"]


def _recording(fn, calls: list):
    def record(img, *args, **kwargs):
        calls.append(args)
        return fn(img, *args, **kwargs)
    return record


def test_posterize_keeps_the_old_meaning(photos):
    """0 (or fewer) bits kept: every channel 0, as Pillow computed it up to version 12; 1 to 8
    bits: timm's posterize unchanged."""
    for img in (photos[1], photos[1].convert("L")):
        for bits in (0, -1):
            out = posterize(img, bits)
            assert out.mode == img.mode and out.size == img.size and not np.asarray(out).any()
        for bits in range(1, 9):
            assert np.array_equal(np.asarray(posterize(img, bits)), np.asarray(TIMM_POSTERIZE(img, bits)))


def test_guard_changes_only_the_given_transform():
    transform = auto_augment.rand_augment_transform("rand-m9-mstd0.5-inc1", {})
    assert guard_posterize(transform) is transform
    assert [op.aug_fn for op in transform.ops if op.name == "PosterizeIncreasing"] == [posterize]
    assert auto_augment.NAME_TO_OP["PosterizeIncreasing"] is TIMM_POSTERIZE  # timm's table untouched
    other = auto_augment.rand_augment_transform("rand-m9-mstd0.5-inc1", {})
    assert [op.aug_fn for op in other.ops if op.name == "PosterizeIncreasing"] == [TIMM_POSTERIZE]
    assert guard_posterize(None) is None  # main.py's evaluation-only path has no training transform

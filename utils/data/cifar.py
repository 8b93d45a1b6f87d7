"""CIFAR-10/100 from torchvision's on-disk format, and the CIFAR transfer transform."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from torch.utils.data import Dataset
from torchvision import datasets, transforms

from ..errors import ConfigError, DataError

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
CIFAR_NUM_CLASSES = {"cifar10": 10, "cifar100": 100}


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
    archive = root if root.name == cls.filename else root / cls.filename  # the official download, still packed
    if not folder.is_dir() and archive.is_file():
        raise DataError(f"{name}: {archive} is the packed archive: extract it first "
                        f"(tar xzf {archive} -C {archive.parent}), then pass {archive.parent}")
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

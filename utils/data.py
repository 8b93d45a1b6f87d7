"""ImageFolder datasets with clear errors, and the evaluation / calibration transforms."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import torch
from PIL import Image
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(RuntimeError):
    """A dataset that cannot be used: missing folders, no images, unreadable files."""


def split_dir(root: str | os.PathLike, split: str) -> Path:
    """``root/split`` (``root`` with or without a trailing slash), or a DataError saying what is missing."""
    root = Path(os.path.expanduser(str(root)))
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    path = root / split
    if not path.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DataError(
            f"dataset folder {root} has no '{split}/' folder (expected train/ and val/ ImageFolders; "
            f"found: {', '.join(found) if found else 'no folders'})")
    return path


def load_rgb(path: str) -> Image.Image:
    """Open an image as RGB, or raise a DataError naming the file."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None


class ImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder with errors that name the folder or file at fault."""

    def __init__(self, root: str | os.PathLike, transform: Optional[Callable] = None):
        try:
            super().__init__(str(root), transform=transform, loader=load_rgb)
        except FileNotFoundError as e:
            raise DataError(f"no usable images in {root}: {e}") from None


def eval_transform(img_size: int = 224, crop_pct: float = 0.875,
                   mean=IMAGENET_MEAN, std=IMAGENET_STD) -> transforms.Compose:
    """Resize (bicubic) to img_size / crop_pct, center crop, normalise: 256 -> 224 at the defaults."""
    return transforms.Compose([
        transforms.Resize(int(img_size / crop_pct), interpolation=InterpolationMode.BICUBIC),
        transforms.CenterCrop(img_size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def calibration_transform(img_size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> transforms.Compose:
    """The training-style augmentation the original threshold search used on training images."""
    return transforms.Compose([
        transforms.RandomResizedCrop(img_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def build_split(root: str | os.PathLike, split: str, transform: Optional[Callable]) -> ImageFolder:
    """The ImageFolder at ``root/split``."""
    return ImageFolder(split_dir(root, split), transform=transform)


def seeded_subset(dataset: torch.utils.data.Dataset, size: int, seed: int = 0) -> torch.utils.data.Dataset:
    """A random subset of ``size`` samples (all of them if fewer), the same for the same seed."""
    n = len(dataset)
    if size >= n:
        return dataset
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(n, generator=g)[:size].sort().values
    return torch.utils.data.Subset(dataset, index.tolist())

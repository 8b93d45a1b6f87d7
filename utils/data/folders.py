"""Image folders as datasets: ``root/train`` and ``root/val`` ImageFolders listed with
:func:`utils.data.scan.scan_image_folder`, with errors that name the folder or file at fault."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional

from torchvision import datasets

from ..errors import DataError
from .images import load_rgb
from .scan import IMG_EXTENSIONS, list_classes, scan_image_folder


ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")  # a download not yet extracted (ImageNet's ILSVRC2012_img_*.tar)


def split_dir(root: str | os.PathLike, split: str) -> Path:
    """``root/split`` (``root`` with or without a trailing slash), or a DataError saying what is missing."""
    root = Path(os.path.expanduser(str(root)))
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    path = root / split
    if not path.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        archives = sorted(p.name for p in root.iterdir() if p.is_file() and p.name.endswith(ARCHIVE_SUFFIXES))
        packed = (f"; archives {', '.join(archives)}: extract them into train/ and val/ class folders, "
                  f"or name the split's tar shards {split}.tar" if archives else "")
        if not archives and _holds_class_folders(root, found):
            packed = (f"; {root} holds class folders of images itself, one split: put it (or a link to it) at "
                      f"DIR/{split} and pass DIR, e.g. mkdir -p DIR && ln -s {root.resolve()} DIR/{split}")
        listed = ", ".join(found[:8]) + (f", ... ({len(found)} folders)" if len(found) > 8 else "")
        raise DataError(
            f"dataset folder {root} has no '{split}/' folder (expected train/ and val/ ImageFolders; "
            f"found: {listed or 'no folders'}{packed})")
    return path


def _holds_class_folders(root: Path, folders: list[str], look: int = 3) -> bool:
    """Whether the first few of ``root``'s folders hold image files (a split's class folders,
    such as ImageNet-V2 unpacks); a few directory entries read at most."""
    for name in folders[:look]:
        try:
            with os.scandir(root / name) as entries:
                for _, entry in zip(range(50), entries):
                    if entry.name.lower().endswith(IMG_EXTENSIONS) and entry.is_file():
                        return True
        except OSError:
            continue
    return False


class ImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder with errors that name the folder or file at fault, listed by
    :func:`utils.data.scan.scan_image_folder` (the same classes and order; symbolic-link loops,
    hidden and AppleDouble files are harmless, long listings report progress)."""

    def __init__(self, root: str | os.PathLike, transform: Optional[Callable] = None):
        try:
            super().__init__(str(root), transform=transform, loader=load_rgb)
        except FileNotFoundError as e:
            raise DataError(f"no usable images in {root}: {e}") from None

    def find_classes(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        classes = list_classes(directory)
        return classes, {c: i for i, c in enumerate(classes)}

    def make_dataset(self, directory: str | os.PathLike, class_to_idx: dict[str, int], extensions: Any = None,
                     is_valid_file: Any = None, allow_empty: bool = False) -> list[tuple[str, int]]:
        listed = scan_image_folder(directory, extensions or IMG_EXTENSIONS)
        if listed.class_to_idx != class_to_idx:
            raise DataError(f"the class folders of {directory} changed while it was being listed")
        return listed.samples


def build_split(root: str | os.PathLike, split: str, transform: Optional[Callable]) -> ImageFolder:
    """The ImageFolder at ``root/split``."""
    return ImageFolder(split_dir(root, split), transform=transform)

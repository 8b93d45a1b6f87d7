"""Tar-sharded image datasets, read in place through timm's tar reader.

A split may be stored as tar archives instead of a folder of files (one large file per shard
is kinder to shared and object file systems than a million small ones):

* ``DIR/train/`` holding ``*.tar`` shards, or a single ``DIR/train.tar``;
* inside the archives, images under a folder named after their class
  (``n01440764/n01440764_10026.JPEG``), exactly as in the ImageFolder; an archive may hold
  any mix of classes; an image at the top of an archive takes the archive's name as its class.

``tar -cf DIR/train/shard-000.tar -C DIR_FOLDER/train n01440764 n01443537 ...`` makes one.
The reader (``timm.data.readers.ReaderImageInTar``) indexes every member once at start-up and
then reads samples by index, so the seeded order, per-sample augmentation and exact resume work
as with folders. Classes are numbered in sorted order and samples ordered as torchvision's
ImageFolder orders the same files, so a tar copy of a folder trains to the same numbers.
"""
from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from torch.utils.data import Dataset

from ..errors import DataError
from .images import decode_rgb


def tar_split(root: str | os.PathLike, split: str) -> Optional[Path]:
    """``root/split.tar``, or ``root/split`` when that folder holds ``.tar`` files and no class
    folders; None when the split is an ordinary ImageFolder (or absent)."""
    root = Path(os.path.expanduser(str(root)))
    single = root / f"{split}.tar"
    if single.is_file() and not (root / split).is_dir():
        return single
    folder = root / split
    if folder.is_dir():
        entries = [e for e in os.scandir(folder) if not e.name.startswith(".")]
        has_tars = any(e.name.endswith(".tar") and e.is_file() for e in entries)
        if has_tars and not any(e.is_dir() for e in entries):
            return folder
    return None


class TarImageFolder(Dataset):
    """The images of tar shards as an ImageFolder-like dataset: ``(image, class index)`` pairs,
    with ``classes``, ``class_to_idx``, ``targets`` and ``samples`` (``archive:member``, index).

    Args:
        root: a ``.tar`` file or a folder of ``.tar`` shards.
        transform: applied to the RGB PIL image.
    """

    def __init__(self, root: str | os.PathLike, transform: Optional[Callable] = None) -> None:
        from timm.data.readers.reader_image_in_tar import ReaderImageInTar

        self.root = str(root)
        self.transform = transform
        try:
            reader = ReaderImageInTar(self.root)
        except (AssertionError, ValueError) as e:  # timm asserts that images were found
            raise DataError(f"no usable images in the tar shards of {root}: {e or 'no images found'}") from None
        except (OSError, tarfile.TarError, EOFError) as e:
            raise DataError(f"cannot read the tar shards of {root}: {e}") from None
        self.classes = sorted(reader.class_name_to_idx)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        relabel = np.array([self.class_to_idx[reader.class_idx_to_name[i]] for i in range(len(self.classes))])
        targets = relabel[reader.targets]
        members = [row[0].path for row in reader.samples]
        order = sorted(range(len(members)), key=lambda i: (int(targets[i]), members[i]))
        reader.samples = reader.samples[order]
        reader.targets = targets[order]
        self.reader = reader
        self.targets = [int(t) for t in reader.targets]
        self.samples = [(self._name(i), t) for i, t in enumerate(self.targets)]

    def _name(self, index: int) -> str:
        member, archive, child = self.reader.samples[index]
        where = os.path.join(self.root, archive) if archive else self.root
        inner = f"{child.name}:" if child is not None else ""
        return f"{where}:{inner}{member.path}"

    def __len__(self) -> int:
        return len(self.reader)

    def __getstate__(self) -> dict:
        """Open archives are per process: they are closed (and reopened on demand) when the
        dataset is sent to another process (loader workers, other ranks)."""
        states = [self.reader.tar_state] if self.reader.root_is_tar else list(self.reader.tar_state.values())
        while states:
            state = states.pop()
            if state.tf is not None:
                state.tf.close()
                state.tf = None
            states.extend(state.children.values())
        return self.__dict__

    def __getitem__(self, index: int) -> tuple[Any, int]:
        try:
            stream, target = self.reader[index]
        except (OSError, tarfile.TarError, EOFError, KeyError) as e:
            raise DataError(f"cannot read image {self._name(index)}: {e}") from None
        img = decode_rgb(stream, self._name(index))
        if self.transform is not None:
            img = self.transform(img)
        return img, int(target)

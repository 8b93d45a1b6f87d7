"""Images to classify, streamed in batches with constant memory.

Sources are image files, folders (walked recursively, in sorted order, skipping hidden
files and folders, each real folder once) and text files listing one path per
line (``.txt``/``.lst``; relative paths are taken from the current directory), and uncompressed
tar archives (``.tar``: their images in archive order, named ``ARCHIVE:MEMBER``, see
:mod:`utils.data.tar_members`). The paths are
produced lazily, so a source of any size costs no memory; each batch is read by one loader
worker, and batches come back in input order. An image that cannot be read gives an error
entry in its batch instead of ending the run.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Optional, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision import transforms

from ..data.images import heif_decoder
from ..data.scan import suffix_of
from ..data.tar_members import is_tar_name, iter_tar_members, open_rgb
from ..errors import ConfigError, one_line

# what cameras, phones and browsers save; HEIC/HEIF is read where pillow-heif is installed, else
# each such file gets a row saying so (never skipped without a word)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff",
                  ".webp", ".avif", ".heic", ".heif")
LIST_SUFFIXES = (".txt", ".lst")


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith(".")


def _walk_files(folder: str | os.PathLike) -> Iterator[tuple[str, list[str]]]:
    """(folder, its non-hidden file names, sorted) for ``folder`` and every folder under it, in
    sorted order. Links to folders are followed, each real folder once, so a link loop ends."""
    seen: set[tuple[int, int]] = set()  # (device, inode) of the folders walked: one entry per folder
    for root, dirs, files in os.walk(folder, followlinks=True):
        try:
            st = os.stat(root)
        except OSError:  # removed or unreadable since it was listed: nothing to take from it
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        yield root, sorted(f for f in files if not f.startswith("."))


def walk_images(folder: str | os.PathLike) -> Iterator[str]:
    """Image files under ``folder``, recursively and in sorted order (see :func:`_walk_files`)."""
    for root, files in _walk_files(folder):
        yield from (os.path.join(root, name) for name in files if is_image_name(name))


def files_left_out(sources: Sequence[str | os.PathLike]) -> Counter[str]:
    """The files under the folders of ``sources`` that are not images by name (a phone's videos,
    sidecar files), counted by type: what :func:`iter_image_paths` leaves out of them."""
    counts: Counter[str] = Counter()
    for source in sources:
        if os.path.isdir(source):
            for _, files in _walk_files(source):
                counts.update(suffix_of(name) for name in files if not is_image_name(name))
    return counts


def read_list(path: str | os.PathLike) -> Iterator[str]:
    """The non-blank lines of a list file, one path each; folders in it are walked."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            entry = line.strip()
            if not entry:
                continue
            if os.path.isdir(entry):
                yield from walk_images(entry)
            else:
                yield entry


def iter_image_paths(sources: Sequence[str | os.PathLike]) -> Iterator[str]:
    """Every image path of ``sources`` (files, folders, list files), lazily and in order."""
    for source in sources:
        source = os.fspath(source)
        if os.path.isdir(source):
            yield from walk_images(source)
        elif source.lower().endswith(LIST_SUFFIXES):
            yield from read_list(source)
        elif is_tar_name(source):
            yield from iter_tar_members(source, is_image_name)
        else:
            yield source


def check_sources(sources: Sequence[str | os.PathLike]) -> list[str]:
    """The sources as strings, after checking that each exists, that list files can be read
    and that folders and list files hold at least one image (a ConfigError otherwise)."""
    if not sources:
        raise ConfigError("nothing to classify: give image files, folders or list files")
    checked = []
    for source in map(os.fspath, sources):
        path = Path(source)
        if not path.exists():
            remote = " (images are read from files here, not fetched: download it first)" if "://" in source else ""
            raise ConfigError(f"no such file or folder: {source}{remote}")
        if path.is_dir():
            if next(walk_images(path), None) is None:
                raise ConfigError(f"no images in {source} (looked for {', '.join(IMAGE_SUFFIXES)})")
        elif source.lower().endswith(LIST_SUFFIXES):
            try:
                first = next(read_list(path), None)  # reads up to the first path, however long the list
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"cannot read the list file {source}: {e}") from None
            if first is None:
                raise ConfigError(f"no images in {source}: the list file names no image (one path per line)")
        checked.append(source)
    return checked


class ImageBatch(NamedTuple):
    """images: (B', 3, H, W) of the readable paths, in order; paths: all B paths of the
    batch; errors: per path, None or why it could not be read (B' = number of Nones)."""
    images: torch.Tensor
    paths: list[str]
    errors: list[Optional[str]]


def draft_size(transform: Callable) -> Optional[int]:
    """How large a JPEG is decoded before ``transform`` (``decode_rgb``'s ``draft``): twice the
    shorter side its first resize makes, so that resize still shrinks the image at least 2x; None
    (full size) for a transform without a resize."""
    for step in getattr(transform, "transforms", ()):
        if isinstance(step, transforms.Resize):
            return 2 * (step.size if isinstance(step.size, int) else min(step.size))
    return None


def read_photo(path: str, transform: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    """An image file (or tar member) as classifying one's own images reads it: HEIC/HEIF too where
    pillow-heif is installed, turned as its EXIF orientation says, a JPEG decoded at a reduced
    scale where ``transform`` resizes it much smaller anyway; then ``transform``."""
    heif_decoder()  # registered once per process, loader workers included
    return transform(open_rgb(path, exif_orientation=True, draft=draft_size(transform)))


def load_batch(paths: list[str], transform: Callable[[Image.Image], torch.Tensor]) -> ImageBatch:
    """Read each path (:func:`read_photo`); a failure is recorded, never raised."""
    tensors, errors = [], []
    for path in paths:
        try:
            tensors.append(read_photo(path, transform))
            errors.append(None)
        except Exception as e:  # any failure of one image (format, truncation, size) stays its own
            errors.append(one_line(e))
    images = torch.stack(tensors) if tensors else torch.empty(0)
    return ImageBatch(images, paths, errors)


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class ImageBatches(IterableDataset):
    """Batches of ``batch_size`` consecutive paths of ``sources``, read and transformed.

    With W loader workers, worker w reads batches w, w + W, w + 2W, ...; the loader takes
    one batch from each worker in turn, so batches arrive in input order.
    """

    def __init__(self, sources: Sequence[str], transform: Callable, batch_size: int) -> None:
        self.sources = list(sources)
        self.transform = transform
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[ImageBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for k, paths in enumerate(_chunks(iter_image_paths(self.sources), self.batch_size)):
            if k % workers == worker:
                yield load_batch(paths, self.transform)


def _keep(batch: ImageBatch) -> ImageBatch:
    return batch


def stream_batches(sources: Sequence[str], transform: Callable, batch_size: int = 64, workers: int = 0,
                   pin_memory: bool = False) -> Iterator[ImageBatch]:
    """:class:`ImageBatch` after :class:`ImageBatch` over every image of ``sources``, in order.

    Args:
        sources: image files, folders and list files (see the module docstring).
        transform: PIL image -> (3, H, W) tensor.
        batch_size: paths per batch.
        workers: loader processes (0: read in this process).
        pin_memory: pin the batches (for a CUDA device).
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    loader = DataLoader(ImageBatches(sources, transform, batch_size), batch_size=None, num_workers=workers,
                        collate_fn=_keep, pin_memory=pin_memory)
    yield from loader

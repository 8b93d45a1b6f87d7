"""Reading images for training and evaluation: any PIL mode to 8-bit RGB, and the bad-image policy.

``to_rgb`` converts every mode a dataset may hold, where ``Image.convert("RGB")`` alone is wrong:

* 16-bit grayscale (``I;16``, ``I;16B``, ``I;16L``) and 32-bit integer (``I``) images are
  scaled from 0..65535 to 0..255 (PIL's own conversion clips them at 255, which turns most of
  a 16-bit image white);
* float images (``F``) are taken as intensities in 0..1 when every value is in that range,
  else as 0..255 (the two conventions of float image files);
* images with transparency (``RGBA``, ``LA``, ``PA``, palette images with a transparent
  index, premultiplied ``RGBa``/``La``) are composited over a white background instead of
  showing whatever colour the transparent pixels happen to hold;
* CMYK images with an embedded ICC profile go through that profile to sRGB;
* grayscale, bilevel, palette, YCbCr, LAB and HSV images use PIL's conversion.

``upright`` turns an image as its EXIF orientation tag says (a phone stores a portrait photo as
landscape pixels and that tag). Classifying one's own images applies it (``exif_orientation``);
training and evaluation read the stored pixels, as torchvision's ``ImageFolder`` loader does and
as the published accuracies were measured.

The bad-image policy (``--bad-images``): ``error`` stops at the first unreadable file with a
one-line error naming it; ``skip`` replaces the sample with another of the same batch, logs one
line per file and counts it; the run still stops when more than a set fraction of a split fails.
"""
from __future__ import annotations

import io
import logging
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import PIL
from PIL import Image, ImageOps, JpegImagePlugin, features
from torch.utils.data import DataLoader, Dataset, default_collate

from ..errors import DataError

_logger = logging.getLogger("dvt.train")
BAD_IMAGE_POLICIES = ("error", "skip")
WHITE = (255, 255, 255)
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _from_array(values: np.ndarray) -> Image.Image:
    """An 8-bit grayscale image from values already in 0..255."""
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    """16-bit (or 32-bit integer holding 16-bit data) grayscale scaled to 8 bits: 65535 -> 255."""
    values = np.asarray(img).astype(np.float64)
    return _from_array(np.clip(values, 0, 65535) / 257.0)


def _float_to_l(img: Image.Image) -> Image.Image:
    values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
    if values.size and values.min() >= 0.0 and values.max() <= 1.0:
        values = values * 255.0
    return _from_array(values)


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def _over_background(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Composite an image with transparency over a plain background."""
    if img.mode == "La":  # premultiplied grayscale: PIL has no direct conversion to RGBA
        img = img.convert("LA")
    rgba = img.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, background + (255,))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    profile = img.info.get("icc_profile")
    if profile:
        try:
            from PIL import ImageCms

            source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            return ImageCms.profileToProfile(img, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception:  # a damaged or unsupported profile: fall back to the plain formula
            pass
    return img.convert("RGB")


def to_rgb(img: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """The image as 8-bit RGB, whatever its mode (see the module docstring).

    Args:
        img: an opened PIL image of any mode.
        background: the colour transparent pixels are composited over.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_l(img).convert("RGB")
    if mode == "F":
        return _float_to_l(img).convert("RGB")
    if _has_alpha(img):
        return _over_background(img, background)
    if mode == "CMYK":
        return _cmyk_to_rgb(img)
    return img.convert("RGB")


EXIF_ORIENTATION = 0x0112


def upright(img: Image.Image) -> Image.Image:
    """The image as a viewer shows it: rotated and mirrored as its EXIF orientation tag says;
    the image itself when it has no such tag, or one that cannot be read (no orientation known)."""
    try:
        if img.getexif().get(EXIF_ORIENTATION, 1) in (2, 3, 4, 5, 6, 7, 8):
            return ImageOps.exif_transpose(img)
    except Exception:  # a damaged EXIF block: the stored orientation is all there is
        pass
    return img


HEIF_SUFFIXES = (".heic", ".heif")


@lru_cache(maxsize=None)
def heif_decoder() -> bool:
    """Whether PIL opens HEIC/HEIF photos (an iPhone's default format) in this process: it does
    where the optional ``pillow-heif`` plugin is installed, registered here on first call."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener()
    return True


def _missing_decoder(name: str) -> str:
    """What to do about a file whose kind this Pillow cannot decode, from its suffix ('' if known)."""
    suffix = os.path.splitext(str(name))[1].lower()
    if suffix in HEIF_SUFFIXES and not heif_decoder():
        return " (HEIC/HEIF photos need the pillow-heif plugin: pip install pillow-heif, or convert them to JPEG)"
    if suffix == ".avif" and not ("avif" in features.modules and features.check_module("avif")):
        return f" (Pillow {PIL.__version__} reads no AVIF here: Pillow 11.2 or newer does)"
    return ""


def _open_drafted(stream: Any, draft: int) -> Image.Image:
    """``Image.open`` with a JPEG set to decode at 1/2 or 1/4 scale (see :func:`decode_rgb`); PIL's
    decompression-bomb limit then applies to the pixels decoded, not to the size stored, so a
    200-megapixel phone photo decodes (at 1/4: 12.5 megapixels) where a full decode is refused."""
    start = stream.tell()
    try:
        with warnings.catch_warnings():  # the size stored may be over the limit; the size decoded is checked below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(stream)
    except Image.DecompressionBombError:
        stream.seek(start)
        if stream.read(3) != b"\xff\xd8\xff":  # not a JPEG: nothing is decoded smaller
            raise
        stream.seek(start)
        img = JpegImagePlugin.JpegImageFile(stream)  # the plugin alone: its header, no size check
    if img.format == "JPEG":
        img.draft(img.mode, (max(draft, img.width // 8 + 1), draft))  # width // 8 + 1: at most 1/4
    limit = Image.MAX_IMAGE_PIXELS and 2 * Image.MAX_IMAGE_PIXELS  # where PIL refuses an image (None: never)
    if limit and img.width * img.height > limit:
        raise Image.DecompressionBombError(f"Image size ({img.width * img.height} pixels, decoded at a reduced scale) "
                                           f"exceeds limit of {limit} pixels, could be decompression bomb DOS attack.")
    return img


def load_rgb(path: str, exif_orientation: bool = False, draft: Optional[int] = None) -> Image.Image:
    """Open an image file as 8-bit RGB (see :func:`to_rgb`), or raise a DataError naming the file.

    Damaged, truncated and unidentifiable files, and images over PIL's decompression-bomb
    limit, all raise the DataError. ``exif_orientation`` and ``draft``: see :func:`decode_rgb`."""
    try:
        with open(path, "rb") as f:
            return decode_rgb(f, path, exif_orientation, draft)
    except OSError as e:
        raise DataError(f"cannot read image {path}: {e.strerror or e}") from None


def decode_rgb(stream: Any, name: str, exif_orientation: bool = False, draft: Optional[int] = None) -> Image.Image:
    """Decode an image from a binary file object (a file, a member of a tar archive) as 8-bit RGB.

    Args:
        stream: readable binary file object.
        name: the name the error message gives for it.
        exif_orientation: turn the image as its EXIF orientation tag says (:func:`upright`).
        draft: decode a JPEG at the smallest scale, 1/2 or 1/4 (done by the decoder), whose
            sides are both at least this many pixels: a 12-megapixel photo to be resized to a
            few hundred pixels decodes about 2.5 times as fast (None: full size). Not 1/8, which
            the decoder makes from each block's mean alone (about 2 levels off per pixel).
    """
    try:
        img = Image.open(stream) if draft is None else _open_drafted(stream, draft)
        img.load()
        return to_rgb(upright(img) if exif_orientation else img)
    except Image.DecompressionBombError as e:
        raise DataError(f"cannot read image {name}: {e} (raise PIL.Image.MAX_IMAGE_PIXELS if it is genuine)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        detail = str(e).strip() or type(e).__name__
        if detail.startswith("cannot identify image file"):  # Pillow names its stream object: the path is said already
            detail = "cannot identify image file (not an image, or a kind this Pillow does not read)"
        raise DataError(f"cannot read image {name}: {detail}{_missing_decoder(name)}") from None


@dataclass(frozen=True)
class BadSample:
    """Stands in for a sample whose image could not be read; ``reason`` names the file."""
    reason: str


class SkipBadImages(Dataset):
    """Wraps a dataset so that a sample whose image cannot be read (a :class:`DataError`)
    becomes a :class:`BadSample`, which :func:`collate_skipping` takes out of its batch.

    Args:
        dataset: the dataset to wrap.
        substitute: instead, log the file and return the next readable sample (for the
            per-sample statistics of the released file, which must keep one entry per index).
    """

    def __init__(self, dataset: Dataset, substitute: bool = False) -> None:
        self.dataset = dataset
        self.substitute = substitute

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:  # classes, samples, ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: Any) -> Any:
        try:
            return self.dataset[index]
        except DataError as e:
            if not self.substitute:
                return BadSample(str(e))
            _logger.warning(f"skipped an unreadable image (the next one stands in for it): {e}")
        for k in range(1, len(self.dataset)):
            try:
                return self.dataset[(index + k) % len(self.dataset)]
            except DataError:
                continue
        raise DataError(f"no image of the {len(self.dataset)} of the dataset can be read")


def collate_skipping(batch: Sequence[Any], fill: bool = True) -> tuple[Any, Any, list[str]]:
    """Collate a batch that may hold :class:`BadSample` entries: ``(images, targets, reasons)``.

    Args:
        batch: samples as the dataset returns them.
        fill: replace each bad sample by a good one of the same batch (training: the batch
            keeps its size, which mixup and the learning-rate recipe expect); otherwise drop it
            (evaluation: every image is counted at most once).
    """
    reasons = [s.reason for s in batch if isinstance(s, BadSample)]
    good = [s for s in batch if not isinstance(s, BadSample)]
    if not good:
        raise DataError(f"every image of a batch is unreadable, e.g. {reasons[0]}")
    if reasons and fill:
        good = [good[i % len(good)] for i in range(len(batch))]
    images, targets = default_collate(good)
    return images, targets, reasons


def collate_filling(batch: Sequence[Any]) -> tuple[Any, Any, list[str]]:
    return collate_skipping(batch, fill=True)


def collate_dropping(batch: Sequence[Any]) -> tuple[Any, Any, list[str]]:
    return collate_skipping(batch, fill=False)


class BadImageCounter:
    """Iterates over a loader built with :func:`collate_skipping`, yields ``(images, targets)``,
    logs one line per unreadable image and counts them (``count``; ``reset()`` per epoch).

    Args:
        loader: the DataLoader.
        rank: the process's rank, named in the log line.
        split: ``"train"``, ``"val"``, ... for the log line.
    """

    def __init__(self, loader: DataLoader, rank: int = 0, split: str = "train") -> None:
        self.loader = loader
        self.rank = rank
        self.split = split
        self.count = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:  # sampler, dataset, batch_size, ... of the loader
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def reset(self) -> None:
        self.count = 0

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        for images, targets, reasons in self.loader:
            for reason in reasons:
                self.count += 1
                _logger.warning(f"rank {self.rank}: skipped an unreadable {self.split} image "
                                f"({self.count} so far this pass): {reason}")
            yield images, targets


def check_bad_fraction(bad: int, total: int, max_fraction: float, split: str = "training") -> None:
    """Raise a DataError when more than ``max_fraction`` of the ``total`` images of a split failed.

    Args:
        bad: unreadable images counted over all ranks.
        total: images in the split.
        max_fraction: the largest share of unreadable images the run accepts.
        split: for the message.
    """
    if bad > max_fraction * total:
        raise DataError(f"{bad} of the {total} {split} images could not be read, more than "
                        f"--bad-images-max-fraction {max_fraction:g}; see the log for the files")


def loader_collate(policy: str, fill: bool) -> Optional[Callable]:
    """The collate function a loader needs under ``policy``: None (the default) for ``error``."""
    if policy == "error":
        return None
    return collate_filling if fill else collate_dropping

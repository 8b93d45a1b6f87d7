"""Image transforms: the evaluation and calibration transforms, the dataset statistics,
training augmentation that behaves the same on every supported Pillow, and normalisation
of uint8 batches on the device."""
from __future__ import annotations

import re
from typing import Any, Iterator, Optional, Sequence

import torch
from PIL import Image
from timm.data import auto_augment
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from ..errors import ConfigError
from .cifar import CIFAR_MEAN, CIFAR_STD

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def default_mean_std(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet statistics for image folders, CIFAR statistics for CIFAR (as T2T-ViT's transfer script)."""
    if dataset.startswith("cifar"):
        return CIFAR_MEAN, CIFAR_STD
    return IMAGENET_MEAN, IMAGENET_STD


# timm's augmentation specs: "rand-m9-mstd0.5-inc1", "augmix-m5-w4-d2", "original-mstd0.5". timm
# skips sections it cannot parse and asserts on unknown keys; these are checked before a run.
_AA_SECTIONS = {
    "rand": {"m": int, "n": int, "mstd": float, "mmax": int, "inc": int, "p": float},
    "augmix": {"m": int, "w": int, "d": int, "a": float, "b": int, "mstd": float},
    "auto": {"mstd": float},
}
_AA_POLICIES = ("original", "originalr", "v0", "v0r", "3a")
_AA_EXAMPLES = "rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, original-mstd0.5 or none"


def check_auto_augment(spec: Optional[str], flag: str = "--aa") -> None:
    """An auto-augmentation spec timm can build, or a ConfigError naming the part at fault.

    Args:
        spec: ``rand-...``, ``augmix-...``, an AutoAugment policy (``original``, ``v0``, ...)
            with optional sections, or None / ``""`` / ``none`` for no auto-augmentation.
        flag: how the message names the option.
    """
    if spec in (None, "", "none"):
        return
    head, *sections = str(spec).split("-")
    if head in ("rand", "augmix"):
        known = _AA_SECTIONS[head]
    elif head in _AA_POLICIES:
        known = _AA_SECTIONS["auto"]
    else:
        raise ConfigError(f"{flag} {spec}: unknown augmentation {head!r}; use rand-..., augmix-..., one of "
                          f"{', '.join(_AA_POLICIES)}, or none (e.g. {_AA_EXAMPLES})")
    for section in sections:
        if head == "rand" and section.startswith("t"):
            continue  # a choice of transforms, read by timm
        match = re.fullmatch(r"([a-z]+)(\d.*)", section)
        key = match.group(1) if match else section
        if key not in known:
            raise ConfigError(f"{flag} {spec}: unknown section {section!r}; {head} takes "
                              f"{', '.join(k + '<number>' for k in known)} (e.g. {_AA_EXAMPLES})")
        try:
            known[key](match.group(2))
        except ValueError:
            kind = "an integer" if known[key] is int else "a number"
            raise ConfigError(f"{flag} {spec}: in section {section!r}, {key} takes {kind}") from None


TIMM_POSTERIZE = auto_augment.posterize


def posterize(img: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's posterize, with ``bits_to_keep <= 0`` meaning what it meant up to Pillow 12:
    no bit of any channel is kept, so every pixel becomes 0.

    Args:
        img: an "L" or "RGB" image (the modes Pillow's posterize accepts).
        bits_to_keep: most significant bits kept per channel.
        kwargs: timm's op keywords (fill colour, resampling), unused by posterize.
    """
    if bits_to_keep >= 1:
        return TIMM_POSTERIZE(img, bits_to_keep, **kwargs)
    if img.mode not in ("L", "RGB"):
        raise ValueError(f"posterize supports L and RGB images, not mode {img.mode}")
    return img.point([0] * (256 * len(img.getbands())))


def augment_ops(transform: Any) -> Iterator[auto_augment.AugmentOp]:
    """Every timm ``AugmentOp`` inside a transform: through ``Compose.transforms``,
    ``RandAugment.ops``, ``AugMixAugment.ops`` and ``AutoAugment.policy``."""
    if isinstance(transform, auto_augment.AugmentOp):
        yield transform
    elif isinstance(transform, (list, tuple)):
        for t in transform:
            yield from augment_ops(t)
    else:
        for attr in ("transforms", "ops", "policy"):
            yield from augment_ops(getattr(transform, attr, ()))


def guard_posterize(transform: Any) -> Any:
    """Give every posterize op of ``transform`` the guarded :func:`posterize`, in place.

    Only this transform's op objects change (their ``aug_fn``); timm's op table and other
    transforms keep timm's function. Returns ``transform``.
    """
    for op in augment_ops(transform):
        if op.aug_fn is TIMM_POSTERIZE:
            op.aug_fn = posterize
    return transform


class DeviceNormalize:
    """Training batches travel from the loader workers as uint8 (a quarter of the bytes of
    float32) and are normalised where the model runs, followed by timm's random erasing, which
    needs the normalised values and so moves to the device too.

    The erasing then draws from the global generators, which the training loop seeds before
    every step from (seed, rank, epoch, step): a resumed run draws exactly what the
    uninterrupted one drew.

    Args:
        mean: per-channel mean in 0..1.
        std: per-channel standard deviation in 0..1.
        re_prob: random-erasing probability (0: none).
        re_mode: timm's erasing mode (``pixel``, ``rand``, ``const``).
        re_count: the most rectangles erased per image.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], re_prob: float = 0.0, re_mode: str = "pixel",
                 re_count: int = 1) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.re = (re_prob, re_mode, re_count)
        self._erase: dict[str, Any] = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 on the device -> normalised float32 (as ToTensor + Normalize)."""
        x = images.float().div_(255.0)
        x = x.sub_(self.mean.to(x.device)).div_(self.std.to(x.device))
        prob, mode, count = self.re
        if prob > 0:
            from timm.data.random_erasing import RandomErasing

            key = str(x.device)
            if key not in self._erase:
                self._erase[key] = RandomErasing(prob, mode=mode, max_count=count, device=key)
            x = self._erase[key](x)
        return x

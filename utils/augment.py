"""Training augmentation that behaves the same on every supported Pillow.

timm's RandAugment and AutoAugment ops call ``PIL.ImageOps.posterize``. With magnitude noise
(``mstd``) the ``PosterizeIncreasing`` op reaches the top magnitude and asks to keep 0 bits.
Pillow up to 12 computed that as an all-zero lookup table (a black image); newer Pillow
raises ``ValueError`` instead, which kills a data-loader worker and with it the training run.
:func:`guard_posterize` gives the ops of one transform a posterize that keeps the old meaning;
timm itself is left untouched.
"""
from __future__ import annotations

from typing import Any, Iterator

from PIL import Image
from timm.data import auto_augment

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

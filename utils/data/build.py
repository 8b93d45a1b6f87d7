"""The datasets and loaders of a run, built from main.py's options: the training and
validation sets with their transforms (ImageFolders, tar shards or CIFAR), the seeded
calibration subset the thresholds are fitted on, and this rank's loaders."""
from __future__ import annotations

import argparse
import copy
import logging
from typing import Any, NamedTuple, Optional

import torch.nn as nn
from timm.data import create_transform

from ..errors import ConfigError
from ..run.distributed import DistEnv, on_rank_zero
from ..run.preflight import check_image_sizes
from ..run.signals import StopSignal, signals_raise
from ..train.rng import STREAM_TRAIN_SAMPLES
from .cifar import CIFAR_NUM_CLASSES, cifar_train_transform, load_cifar
from .classes import check_checkpoint_classes, check_split_classes, few_classes_warning
from .folders import build_split, split_dir
from .images import BadImageCounter, SkipBadImages, loader_collate
from .loader import EpochSampler, SeededDataset, ShardSampler, calibration_subset, make_loader
from .scan import list_classes
from .shards import TarImageFolder, tar_split
from .transforms import DeviceNormalize, calibration_transform, default_mean_std, eval_transform, guard_posterize

_logger = logging.getLogger("dvt.train")

Stats = tuple[float, ...]


def mean_std(args: argparse.Namespace) -> tuple[Stats, Stats]:
    """``--mean`` and ``--std``, each defaulting to the dataset's (ImageNet's; CIFAR's for CIFAR)."""
    default_mean, default_std = default_mean_std(args.dataset)
    return (tuple(args.mean) if args.mean else default_mean, tuple(args.std) if args.std else default_std)


def val_batch_size(args: argparse.Namespace) -> int:
    """The batch size of validation and of the release statistics."""
    return args.batch_size * args.validation_batch_size_multiplier


def normalizes_on_device(args: argparse.Namespace) -> bool:
    """Whether the training loader sends uint8 images: with timm's ImageNet training transform
    the normalisation and the random erasing run on the device (see
    :class:`utils.data.transforms.DeviceNormalize`); the other training transforms send
    normalised float32."""
    return not args.no_aug and args.train_crop == "rrc"


def device_normalize(args: argparse.Namespace) -> Optional[DeviceNormalize]:
    """What turns the training loader's uint8 batches into normalised (and erased) float32 on
    the device; None when the loader sends them normalised."""
    if not normalizes_on_device(args):
        return None
    return DeviceNormalize(*mean_std(args), args.reprob, args.remode, args.recount)


def training_transform(args: argparse.Namespace, img_size: int, crop_pct: float, mean: Stats, std: Stats) -> Any:
    """The training augmentation: none (--no-aug), CIFAR's pad-and-crop (--train-crop pad) or
    timm's ImageNet transform (random resized crop, auto-augment, colour jitter, erasing)."""
    aa = None if args.aa in (None, "", "none") else args.aa
    if args.no_aug:
        transform = eval_transform(img_size, crop_pct, mean, std)
    elif args.train_crop == "pad":
        transform = cifar_train_transform(img_size, args.hflip, mean, std, aa, args.reprob, args.remode, args.recount)
    else:
        transform = create_transform(
            img_size, is_training=True, scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip,
            vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=aa,
            interpolation=args.train_interpolation, mean=mean, std=std, re_prob=args.reprob,
            re_mode=args.remode, re_count=args.recount, use_prefetcher=normalizes_on_device(args))
    return guard_posterize(transform)  # RandAugment's 0-bit posterize, on every Pillow


def build_datasets(args: argparse.Namespace, img_size: int, train_transform: bool = True):
    """(train set with the training transform or None, validation set, number of classes)."""
    mean, std = mean_std(args)
    cifar = args.dataset in CIFAR_NUM_CLASSES
    crop_pct = args.crop_pct if args.crop_pct is not None else (1.0 if cifar else 0.875)
    val_tf = eval_transform(img_size, crop_pct, mean, std)
    train_tf = training_transform(args, img_size, crop_pct, mean, std) if train_transform else None
    if cifar:
        train = load_cifar(args.dataset, args.data, True, train_tf) if train_transform else None
        val = load_cifar(args.dataset, args.data, False, val_tf)
        return train, val, CIFAR_NUM_CLASSES[args.dataset]
    for split in (args.train_split, args.val_split) if train_transform else (args.val_split,):
        if tar_split(args.data, split) is None:
            split_dir(args.data, split)  # both folders exist, before the (slow) scan of either
    train = on_rank_zero(lambda: read_split(args.data, args.train_split, train_tf)) if train_transform else None
    val = on_rank_zero(lambda: read_split(args.data, args.val_split, val_tf))
    return train, val, len(val.classes)


def read_split(root: str, split: str, transform: Any) -> Any:
    """``root/split`` as an ImageFolder, or as tar shards (``split/*.tar`` or ``split.tar``)."""
    shards = tar_split(root, split)
    return TarImageFolder(shards, transform) if shards is not None else build_split(root, split, transform)


def split_classes(root: str, split: str) -> Optional[list[str]]:
    """The class names of ``root/split`` read from its folder names, without listing any image;
    None for tar shards, whose classes are known once their members are read."""
    if tar_split(root, split) is not None:
        return None
    return list_classes(split_dir(root, split))


def calibration_set(args: argparse.Namespace, img_size: int, scanned: Any = None):
    """A seeded random subset of the training images with training-style augmentation (as
    the original threshold search), augmented reproducibly. ``scanned``: the training split
    already listed (its file list is reused, not scanned again)."""
    tf = calibration_transform(img_size, *mean_std(args))
    if scanned is not None:
        base = copy.copy(scanned)
        base.transform = tf
    elif args.dataset in CIFAR_NUM_CLASSES:
        base = load_cifar(args.dataset, args.data, True, tf)
    else:
        base = on_rank_zero(lambda: read_split(args.data, args.train_split, tf))
    if args.bad_images == "skip":
        base = SkipBadImages(base, substitute=True)
    return calibration_subset(base, args.calib_size, args.calib_seed)


def checkpoint_val_set(args: argparse.Namespace, checkpoint: dict, model: nn.Module,
                       source: str) -> tuple[Any, list[str]]:
    """The validation set at the model's image size, its classes checked against the
    checkpoint's (by name when it stores them) before any work; and the dataset's class names
    (empty when it has none)."""
    _, val_set, _ = build_datasets(args, model.img_size, train_transform=False)
    names = list(getattr(val_set, "classes", None) or [])
    if names:
        check_checkpoint_classes(checkpoint.get("class_names"), model.num_classes, names, source,
                                 flag="a dataset with the checkpoint's classes")
    return val_set, names


class TrainData(NamedTuple):
    """The training and validation sets, their loaders, and the sampler that orders each epoch."""
    train_set: SeededDataset
    val_set: Any
    num_classes: int
    sampler: EpochSampler
    train_loader: Any  # a DataLoader, counting unreadable images under --bad-images skip
    val_loader: Any
    train_base: Any = None  # the listed training split, reused for the calibration set


def training_data(args: argparse.Namespace, env: DistEnv) -> TrainData:
    """The datasets (checked against --num-classes and the batch size) and this rank's loaders."""
    train_base, val_set, num_classes = build_datasets(args, args.img_size)
    if args.num_classes is not None:
        if args.num_classes < num_classes:
            raise ConfigError(f"--num-classes {args.num_classes} is smaller than the {num_classes} classes of the data")
        num_classes = args.num_classes
    skip = args.bad_images == "skip"
    train_set = SeededDataset(SkipBadImages(train_base) if skip else train_base, args.seed, STREAM_TRAIN_SAMPLES)
    sampler = EpochSampler(len(train_set), env.world_size, env.rank, args.seed, repeats=args.repeated_aug)
    if sampler.per_rank // args.batch_size < 1:
        raise ConfigError(f"the training set ({len(train_set)} images) has less than one batch per process "
                          f"(--batch-size {args.batch_size} x {env.world_size} processes)")
    train_loader = make_loader(train_set, sampler, args.batch_size, args.workers, env, drop_last=True,
                               pin_memory=args.pin_mem, collate_fn=loader_collate(args.bad_images, fill=True))
    val_loader = make_loader(SkipBadImages(val_set) if skip else val_set,
                             ShardSampler(len(val_set), env.world_size, env.rank), val_batch_size(args),
                             args.workers, env, pin_memory=args.pin_mem,
                             collate_fn=loader_collate(args.bad_images, fill=False))
    if skip:
        train_loader = BadImageCounter(train_loader, env.rank, "training")
        val_loader = BadImageCounter(val_loader, env.rank, "validation")
    return TrainData(train_set, val_set, num_classes, sampler, train_loader, val_loader, train_base)


def checked_training_data(args: argparse.Namespace, env: DistEnv, stop: StopSignal,
                          class_names: Optional[list[str]]) -> tuple[TrainData, Optional[list[str]]]:
    """:func:`training_data`, stopped at once by SIGTERM/SIGINT (nothing to save yet), with the
    validation images checked for decompression bombs; and the class names to store.
    ``class_names``: the classes the checks before the run listed (None for tar shards and
    CIFAR, whose classes are known once read)."""
    with signals_raise(stop.signum):
        data = training_data(args, env)
        val_files = [path for path, _ in getattr(data.val_set, "samples", [])]
        if getattr(args, "bad_images", "error") == "error":
            check_image_sizes(val_files)
    train_classes = getattr(getattr(data.train_set, "dataset", None), "classes", None)
    if class_names is None and train_classes is not None and hasattr(data.val_set, "classes"):
        check_split_classes(list(train_classes), list(data.val_set.classes), args.data, args.train_split,
                            args.val_split)
    names = class_names or list(getattr(data.val_set, "classes", None) or []) or None
    if names is not None and len(names) != data.num_classes:
        names = None  # --num-classes gave more heads than the dataset has classes: no name for each
    warning = few_classes_warning(len(names) if names else data.num_classes)
    if warning:
        _logger.warning(warning)
    return data, names

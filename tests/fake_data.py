"""Small generated datasets for the training tests.

* :func:`make_image_folder`: ``root/train`` and ``root/val`` ImageFolders of PNG images whose
  colour depends on the class, so a tiny model can learn them.
* :func:`make_fake_cifar`: CIFAR-10 or CIFAR-100 in torchvision's on-disk python format
  (``cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta``;
  ``cifar-100-python/train, test, meta``): pickled dicts with the same keys and dtypes as the
  official files. torchvision's own ``CIFAR10``/``CIFAR100`` classes compare each file with
  the MD5 of the official archive, which a generated file cannot match; the training code
  reads these files with :class:`utils.data.cifar.CIFAR10Files` / ``CIFAR100Files``, torchvision's
  readers with the presence check kept and the MD5 check left out.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def class_colour(label: int, num_classes: int) -> np.ndarray:
    """A distinct RGB colour per class."""
    hue = label / max(num_classes, 1)
    return np.array([255 * abs(np.sin(np.pi * (hue + k / 3))) for k in range(3)], dtype=np.float64)


def _image(rng: np.random.Generator, label: int, num_classes: int, size: int) -> np.ndarray:
    """(size, size, 3) uint8: the class colour plus noise."""
    noise = rng.normal(0, 40, (size, size, 3))
    return np.clip(class_colour(label, num_classes) + noise, 0, 255).astype(np.uint8)


def make_image_folder(root: str | Path, num_classes: int = 3, train_per_class: int = 8, val_per_class: int = 4,
                      size: int = 40, seed: int = 0) -> Path:
    """Write ``root/train/class_k/*.png`` and ``root/val/class_k/*.png``; returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label in range(num_classes):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(_image(rng, label, num_classes, size)).save(folder / f"{i:04d}.png")
    return root


def _cifar_batch(rng: np.random.Generator, n: int, num_classes: int, label_key: str, name: str) -> dict:
    labels = [int(v) for v in rng.integers(0, num_classes, n)]
    images = np.stack([_image(rng, y, num_classes, 32) for y in labels])  # (n, 32, 32, 3)
    data = images.transpose(0, 3, 1, 2).reshape(n, 3 * 32 * 32)  # rows: R plane, G plane, B plane
    batch = {"batch_label": name, "data": np.ascontiguousarray(data, dtype=np.uint8),
             "filenames": [f"fake_{name}_{i}.png".replace(" ", "_") for i in range(n)], label_key: labels}
    if label_key == "fine_labels":
        batch["coarse_labels"] = [y // 5 for y in labels]
    return batch


def _dump(obj: dict, path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def make_fake_cifar(root: str | Path, num_classes: int = 10, train_per_batch: int = 8, test_size: int = 16,
                    seed: int = 0) -> Path:
    """Write a fake CIFAR-10 (``num_classes=10``: five training batches of ``train_per_batch``
    images) or CIFAR-100 (``num_classes=100``: one training file of ``5 * train_per_batch``)
    under ``root``; returns ``root`` (the folder torchvision's ``root`` argument names)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    if num_classes == 10:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(1, 6):
            _dump(_cifar_batch(rng, train_per_batch, 10, "labels", f"training batch {k} of 5"),
                  folder / f"data_batch_{k}")
        _dump(_cifar_batch(rng, test_size, 10, "labels", "testing batch 1 of 1"), folder / "test_batch")
        _dump({"label_names": CIFAR10_LABELS, "num_cases_per_batch": train_per_batch, "num_vis": 3072},
              folder / "batches.meta")
    elif num_classes == 100:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        _dump(_cifar_batch(rng, 5 * train_per_batch, 100, "fine_labels", "training batch 1 of 1"), folder / "train")
        _dump(_cifar_batch(rng, test_size, 100, "fine_labels", "testing batch 1 of 1"), folder / "test")
        _dump({"fine_label_names": [f"fine_{k}" for k in range(100)],
               "coarse_label_names": [f"coarse_{k}" for k in range(20)]}, folder / "meta")
    else:
        raise ValueError(f"CIFAR has 10 or 100 classes, not {num_classes}")
    return root

"""A small generated image-classification dataset whose images range from easy to hard.

The demo needs images that a coarse 7x7-token transformer classifies at a glance next to
images that need the fine 14x14 tokens. :func:`make_shapes_dataset` draws one shape per
image (the class) and gives every image a difficulty ``d`` in [0, 1]:

* ``d = 0``: a large, centred, high-contrast shape on a plain background;
* ``d = 1``: a small shape anywhere in the picture, at low contrast, on a shaded, noisy
  background strewn with distractor fragments (segments, dots, arcs, corners) of the same
  contrast, so only fine detail (a ring's hole, a frame's inside, a plus's arms) tells the
  classes apart.

(:mod:`utils.data.shapes` draws the images.) Size, contrast, noise, shading, clutter and
position all move with ``d``; the difficulties are spread evenly over ``difficulty_range`` in
every class and split, and recorded per image
in ``manifest.json`` for analysis. The tree is an ImageFolder (``root/train/<class>/*.png``,
``root/val/<class>/*.png``) written deterministically (same parameters, same files) and
cached: a second call with the same parameters returns at once, one with other parameters
replaces the tree. Images are ``int(img_size / crop_pct)`` pixels wide with the shapes inside
the central ``img_size`` crop, so the evaluation transform (resize to ``img_size / crop_pct``,
centre crop) sees them whole and unresampled.

Command line (used by the demo script)::

    python -m utils.data.synthetic data/shapes --img-size 48
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np
from PIL import Image

from .shapes import SHAPES, render_shape_image

MANIFEST = "manifest.json"
GENERATOR_VERSION = 1  # bump when the drawing changes, so cached trees are redrawn
_TMP_PREFIX = ".shapes-tmp-"
_OLD_PREFIX = ".shapes-old-"


class ShapesDataset(NamedTuple):
    """Result of :func:`make_shapes_dataset`.

    root: the dataset folder (``train/`` and ``val/`` ImageFolders and ``manifest.json``).
    classes: class names, in ImageFolder (sorted) order.
    num_train, num_val: images per split.
    created: False when a complete tree with the same parameters was already there.
    """
    root: Path
    classes: tuple[str, ...]
    num_train: int
    num_val: int
    created: bool


def difficulty_level(difficulty: float) -> str:
    """'easy' (< 1/3), 'medium' or 'hard' (>= 2/3)."""
    return "easy" if difficulty < 1 / 3 else "medium" if difficulty < 2 / 3 else "hard"


def _parameters(num_classes: int, train_per_class: int, val_per_class: int, img_size: int, crop_pct: float,
                seed: int, difficulty_range: tuple[float, float], difficulty_power: float) -> dict[str, Any]:
    return dict(version=GENERATOR_VERSION, classes=list(SHAPES[:num_classes]), train_per_class=train_per_class,
                val_per_class=val_per_class, img_size=img_size, crop_pct=crop_pct, seed=seed,
                difficulty_range=[float(difficulty_range[0]), float(difficulty_range[1])],
                difficulty_power=float(difficulty_power))


def read_manifest(root: str | os.PathLike) -> Optional[dict[str, Any]]:
    """The manifest of a generated tree, or None when there is none (or it is unreadable)."""
    path = Path(root) / MANIFEST
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and "parameters" in manifest else None


def _is_complete(root: Path, manifest: Optional[dict[str, Any]], parameters: dict[str, Any]) -> bool:
    if manifest is None or manifest.get("parameters") != parameters:
        return False
    return all((root / image["path"]).is_file() for image in manifest.get("images", ()))


def _check_args(num_classes: int, train_per_class: int, val_per_class: int, img_size: int, crop_pct: float,
                difficulty_range: tuple[float, float], difficulty_power: float) -> None:
    if not 2 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be between 2 and {len(SHAPES)}, got {num_classes}")
    if train_per_class < 1 or val_per_class < 1:
        raise ValueError(f"need at least one image per class and split, got {train_per_class} / {val_per_class}")
    if img_size < 16:
        raise ValueError(f"img_size must be at least 16 pixels, got {img_size}")
    if not 0.5 <= crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in [0.5, 1], got {crop_pct}")
    lo, hi = difficulty_range
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"difficulty_range must satisfy 0 <= low <= high <= 1, got {difficulty_range}")
    if not difficulty_power > 0:
        raise ValueError(f"difficulty_power must be positive, got {difficulty_power}")


def make_shapes_dataset(
        root: str | os.PathLike,
        num_classes: int = 6,
        train_per_class: int = 500,
        val_per_class: int = 150,
        img_size: int = 48,
        crop_pct: float = 0.875,
        seed: int = 0,
        difficulty_range: tuple[float, float] = (0.0, 1.0),
        difficulty_power: float = 1.0,
        force: bool = False,
        workers: Optional[int] = None,
) -> ShapesDataset:
    """Write (once) the shapes dataset as ImageFolders under ``root``.

    Every class and split gets difficulties spread evenly over ``difficulty_range``
    (stratified: one draw in each of ``n`` equal bins, in shuffled order). Image ``i`` of a
    class and split is drawn from its own seed, derived from ``seed``, the split, the class
    and ``i``, so the same parameters always give the same files.

    An interrupted run leaves no half-written tree (:func:`_build_in_place`). An existing
    ``root`` is replaced only when it is empty or holds a tree made by this function.

    Args:
        root: dataset folder to create.
        num_classes: how many of :data:`SHAPES` to use (2..8).
        train_per_class, val_per_class: images per class in ``train/`` and ``val/``.
        img_size: side of the model's input; the stored images are
            ``int(img_size / crop_pct)`` pixels with the shapes inside the central crop.
        crop_pct: centre-crop fraction of the evaluation transform (0.875 by default).
        seed: seed of the whole tree.
        difficulty_range: (lowest, highest) difficulty drawn, within [0, 1].
        difficulty_power: the difficulties are ``low + (high - low) * u ** power`` with ``u``
            spread evenly over [0, 1]; above 1, easy images are more common.
        force: redraw even when a complete tree with the same parameters exists.
        workers: processes drawing the images (default: one per CPU core; 0 or 1: this
            process only). The files do not depend on it.

    Returns:
        :class:`ShapesDataset`.

    Raises:
        ValueError: bad parameters.
        FileExistsError: ``root`` holds something other than a tree made by this function.
    """
    _check_args(num_classes, train_per_class, val_per_class, img_size, crop_pct, difficulty_range, difficulty_power)
    root = Path(os.path.expanduser(str(root)))
    parameters = _parameters(num_classes, train_per_class, val_per_class, img_size, crop_pct, seed,
                             tuple(difficulty_range), difficulty_power)
    classes = tuple(sorted(parameters["classes"]))
    result = ShapesDataset(root, classes, num_classes * train_per_class, num_classes * val_per_class, False)
    existing = read_manifest(root) if root.is_dir() else None
    if not force and _is_complete(root, existing, parameters):
        return result
    if root.exists() and existing is None and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root} exists and is not a generated shapes dataset (no {MANIFEST}); "
                              "choose another folder or remove it")

    _build_in_place(root, parameters, classes, (os.cpu_count() or 1) if workers is None else workers)
    return result._replace(created=True)


def _build_in_place(root: Path, parameters: dict[str, Any], classes: tuple[str, ...], workers: int) -> None:
    """Draw the tree in a temporary folder next to ``root``, write its manifest last, then move
    it into place (replacing an older tree): an interrupted run leaves nothing half-written."""
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=root.parent))
    try:
        images = _write_tree(tmp, parameters, classes, workers)
        manifest = {"generator": "utils.data.synthetic.make_shapes_dataset", "parameters": parameters,
                    "classes": list(classes), "images": images}
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, separators=(",", ":"))
        if root.exists():
            old = Path(tempfile.mkdtemp(prefix=_OLD_PREFIX, dir=root.parent))
            os.replace(root, old / "tree")
            os.replace(tmp, root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_group(folder: str, parameters: dict[str, Any], split_id: int, label: int, name: str
                 ) -> list[dict[str, Any]]:
    """Draw and save the images of one class in one split; returns their manifest records."""
    split, per_class = (("train", parameters["train_per_class"]), ("val", parameters["val_per_class"]))[split_id]
    shape_id = SHAPES.index(name)
    lo, hi = parameters["difficulty_range"]
    (Path(folder) / split / name).mkdir(parents=True)
    rng = np.random.default_rng([parameters["seed"], split_id, shape_id])
    bins = (np.arange(per_class) + rng.random(per_class)) / per_class
    records = []
    for i, d in enumerate(lo + (hi - lo) * rng.permutation(bins) ** parameters["difficulty_power"]):
        img, p = render_shape_image(name, float(d), parameters["img_size"], parameters["crop_pct"],
                                    seed=[parameters["seed"], split_id, shape_id, i])
        path = f"{split}/{name}/{i:05d}.png"
        Image.fromarray(img).save(Path(folder) / path, compress_level=1)
        records.append({
            "path": path, "split": split, "class": name, "label": label,
            "difficulty": round(p.difficulty, 6), "level": difficulty_level(p.difficulty),
            "radius": round(p.radius, 3), "contrast": round(p.contrast, 4),
            "shading": round(p.shading, 4), "clutter": p.clutter})
    return records


def _write_tree(folder: Path, parameters: dict[str, Any], classes: Sequence[str], workers: int
                ) -> list[dict[str, Any]]:
    """Draw and save every image, one (split, class) group per task; returns the manifest's
    per-image records in a fixed order (every image has its own seed, so the processes that
    draw them do not change them)."""
    groups = [(str(folder), parameters, split_id, label, name)
              for split_id in (0, 1) for label, name in enumerate(classes)]
    if workers <= 1:
        return [r for group in groups for r in _write_group(*group)]
    with ProcessPoolExecutor(max_workers=min(workers, len(groups))) as pool:
        futures = [pool.submit(_write_group, *group) for group in groups]
        return [r for future in futures for r in future.result()]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m utils.data.synthetic ROOT [options]``: make (or find cached) the dataset."""
    parser = argparse.ArgumentParser(description="Generate the easy-to-hard shapes dataset (ImageFolders).")
    parser.add_argument("root", help="dataset folder to create")
    parser.add_argument("--num-classes", type=int, default=6, help=f"classes, the first N of {', '.join(SHAPES)}")
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--val-per-class", type=int, default=150)
    parser.add_argument("--img-size", type=int, default=48, help="model input size (the central crop)")
    parser.add_argument("--crop-pct", type=float, default=0.875, help="evaluation centre-crop fraction")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--difficulty-range", type=float, nargs=2, default=(0.0, 1.0), metavar=("LOW", "HIGH"))
    parser.add_argument("--difficulty-power", type=float, default=1.0,
                        help="above 1: more easy images (difficulty = low + (high - low) * u ** power)")
    parser.add_argument("--force", action="store_true", help="redraw even if a matching dataset exists")
    parser.add_argument("--workers", type=int, default=None, help="drawing processes (default: one per core)")
    args = parser.parse_args(argv)
    try:
        made = make_shapes_dataset(
            args.root, args.num_classes, args.train_per_class, args.val_per_class, args.img_size, args.crop_pct,
            args.seed, tuple(args.difficulty_range), args.difficulty_power, args.force, args.workers)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    state = "wrote" if made.created else "found (cached)"
    print(f"{state} {made.root}: {made.num_train} training and {made.num_val} validation images, "
          f"classes {', '.join(made.classes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Which images leave a DVT cascade at which exit: a picture like the paper's visualisation.

Runs the cascade with real early exit (:meth:`models.dvt.DVT.forward_early_exit`) on an
ImageFolder split and draws, for every exit, a sample of the images that leave there, under
a title with the exit's token grid, its share of the images and its accuracy::

    python scripts/visualize_exits.py --data_url data/shapes --checkpoint_path CKPT \\
        --budget 0.02 --out exits.png

Thresholds come from one of

* ``--budget GFLOPS``: the most accurate thresholds within that average cost
  (:func:`utils.budget.thresholds_for_budget`), fitted on the shown split itself, or on a
  subset of ``--calib_split``;
* ``--thresholds T1 T2 [T3]``: given explicitly (the last exit takes everyone left);
* ``--budget_index P``: row ``P`` (1-based) of the checkpoint's ``dynamic_threshold``.

Works with the released ``.pth.tar`` files (pass ``--model``: they do not name their model)
and with this project's checkpoints (training or released layout, which name it).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torchvision import transforms
from torchvision.transforms import InterpolationMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models import DVT  # noqa: E402
from utils.budget.choice import full_thresholds, stored_thresholds  # noqa: E402
from utils.budget.flops import exit_gflops  # noqa: E402
from utils.budget.plots import save_figure  # noqa: E402
from utils.budget.stats import (  # noqa: E402
    EarlyExitRun,
    collect_early_exit,
    collect_exit_stats,
    exit_shares,
    expected_gflops,
)
from utils.budget.thresholds import thresholds_for_budget  # noqa: E402
from utils.checkpoint.files import load_checkpoint_file  # noqa: E402
from utils.checkpoint.weights import build_from_checkpoint  # noqa: E402
from utils.data.classes import label_numbered_folders  # noqa: E402
from utils.data.folders import build_split  # noqa: E402
from utils.data.loader import make_loader, seeded_subset  # noqa: E402
from utils.data.synthetic import read_manifest  # noqa: E402
from utils.data.transforms import eval_transform  # noqa: E402
from utils.errors import CheckpointError, ConfigError, run_command  # noqa: E402

__all__ = ["parse_thresholds", "resolve_thresholds", "format_threshold", "pick_examples", "draw_exits", "visualize",
           "main"]


# ------------------------------------------------------------------ thresholds

def parse_thresholds(values: Sequence[float], num_exits: int) -> torch.Tensor:
    """One threshold per exit from ``num_exits - 1`` or ``num_exits`` values (the last exit
    takes everyone left, whatever its value)."""
    try:
        return torch.tensor(full_thresholds(values, num_exits), dtype=torch.float32)
    except ConfigError:
        raise ConfigError(f"--thresholds needs {num_exits - 1} values (one per exit but the last) "
                          f"or {num_exits}, got {len(values)}") from None


def resolve_thresholds(
        args: argparse.Namespace,
        model: DVT,
        checkpoint: dict,
        loader: torch.utils.data.DataLoader,
        transform: Any,
        flops: Sequence[float],
) -> tuple[torch.Tensor, str]:
    """The thresholds asked for, and a short description of where they come from. ``--budget``
    fits them on the shown split (``loader``) or on a seeded subset of ``--calib_split``."""
    num_exits = model.num_exits
    if args.thresholds is not None:
        thresholds = parse_thresholds(args.thresholds, num_exits)
        return thresholds, "given thresholds"
    if args.budget_index is not None:
        table = stored_thresholds(checkpoint, num_exits, args.checkpoint_path, torch.float32)
        if table is None:
            raise CheckpointError(f"{args.checkpoint_path} has no 'dynamic_threshold' entry for --budget_index")
        if not 1 <= args.budget_index <= table.shape[0]:
            raise ConfigError(f"--budget_index must be between 1 and {table.shape[0]}, got {args.budget_index}")
        return table[args.budget_index - 1].clone(), f"stored thresholds, budget {args.budget_index}"
    if args.calib_split is not None and args.calib_split != args.split:
        calib_split = build_split(args.data_url, args.calib_split, transform)
        label_numbered_folders(calib_split, checkpoint.get("class_names"), args.calib_split)
        calib_set = seeded_subset(calib_split, args.calib_size, args.seed)
        loader = make_loader(calib_set, None, args.batch_size, args.workers, persistent=False)
    conf, correct = collect_exit_stats(model, loader, progress=False)
    try:
        found = thresholds_for_budget(conf, correct, flops, args.budget)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return found.thresholds, f"budget {args.budget:g} GFLOPs"


# --------------------------------------------------------------------- picture

def format_threshold(value: float) -> str:
    """A threshold for people: 'all' when everyone leaves, 'none' when nobody does."""
    if value <= 0:
        return "all"
    if value > 1:
        return "none"
    return f"{value:.3f}"


def pick_examples(run: EarlyExitRun, num_exits: int, per_exit: int, seed: int = 0) -> list[list[int]]:
    """For every exit, up to ``per_exit`` indices of images leaving there: a seeded random
    sample, most confident first."""
    generator = torch.Generator().manual_seed(seed)
    picked = []
    for k in range(num_exits):
        idx = torch.nonzero(run.exit_index == k).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=generator)[:per_exit]]
        idx = idx[run.confidence[idx].argsort(descending=True)]
        picked.append(idx.tolist())
    return picked


def _caption(classes: Sequence[str], prediction: int, target: int, confidence: float) -> str:
    """'ring 0.93' for a right answer, 'ring 0.61 (circle)' with the true class for a wrong one."""
    text = f"{classes[prediction]} {confidence:.2f}"
    return text if prediction == target else f"{text} ({classes[target]})"


def _exit_accuracy(run: EarlyExitRun, k: int) -> float:
    """Accuracy % on the images leaving at exit k (nan when none does)."""
    here = run.exit_index == k
    return float((run.prediction[here] == run.targets[here]).float().mean()) * 100 if here.any() else float("nan")


def draw_exits(
        images: Sequence[Sequence[np.ndarray]],
        labels: Sequence[Sequence[str]],
        correct: Sequence[Sequence[bool]],
        titles: Sequence[str],
        suptitle: str,
        columns: int = 4,
) -> Figure:
    """One panel per exit, side by side, each a grid of its images; a green frame marks a
    right answer, a red one a wrong answer.

    Args:
        images: per exit, (H, W, 3) uint8 images.
        labels: per exit and image, the caption under it.
        correct: per exit and image, whether the exit's answer is right.
        titles: per exit, the panel title.
        suptitle: the figure title.
        columns: images per row within a panel.
    """
    num_exits = len(images)
    rows = max(1, max((len(x) + columns - 1) // columns for x in images))
    cell = 1.05
    fig = Figure(figsize=(num_exits * columns * cell + 0.3 * (num_exits - 1) + 0.4, rows * (cell + 0.22) + 1.35),
                 layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(suptitle, fontsize=11, fontweight="bold")
    panels = np.atleast_1d(fig.subfigures(1, num_exits, wspace=0.02))
    shades = ("#eef5fb", "#f3f0fa", "#fbf1ec", "#eef8f0")
    for k, panel in enumerate(panels):
        panel.set_facecolor(shades[k % len(shades)])
        panel.suptitle(titles[k], fontsize=9.5)
        axes = np.atleast_2d(panel.subplots(rows, columns, squeeze=False))
        for j, ax in enumerate(axes.flat):
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(images[k]):
                ax.set_axis_off()
                if j == 0:
                    ax.text(0.5, 0.5, "no images", ha="center", va="center", fontsize=9, color="0.4",
                            transform=ax.transAxes)
                continue
            ax.imshow(images[k][j], interpolation="nearest")
            colour = "#2e9b46" if correct[k][j] else "#d23a2a"
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(2.5)
            ax.set_xlabel(labels[k][j], fontsize=7, color="black" if correct[k][j] else colour, labelpad=1.5)
    return fig


def _difficulties(data_url: str, samples: Sequence[tuple[str, int]]) -> Optional[np.ndarray]:
    """Per-image difficulty from a generated dataset's manifest (utils.data.synthetic), else None."""
    manifest = read_manifest(data_url)
    if manifest is None:
        return None
    root = Path(data_url)
    by_path = {os.path.normpath(root / r["path"]): r.get("difficulty") for r in manifest.get("images", ())}
    values = [by_path.get(os.path.normpath(path)) for path, _ in samples]
    if any(v is None for v in values):
        return None
    return np.asarray(values, dtype=np.float64)


# ------------------------------------------------------------------------ command

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Draw which images leave a DVT cascade at which exit, with real early exit.")
    p.add_argument("--data_url", "--data", dest="data_url", required=True,
                   help="dataset folder holding ImageFolder splits (train/, val/)")
    p.add_argument("--split", default="val", help="split to show (default: val)")
    p.add_argument("--checkpoint_path", "--checkpoint", dest="checkpoint_path", required=True,
                   help="checkpoint: released .pth.tar, or this project's (training or released layout)")
    p.add_argument("--model", default=None, help="model name, for files that do not name their model")
    p.add_argument("--img_size", type=int, default=None, help="input resolution (default: the checkpoint's, else 224)")
    p.add_argument("--crop_pct", type=float, default=0.875, help="centre-crop fraction of the eval transform")
    p.add_argument("--weights", default="auto", choices=("auto", "model", "ema"),
                   help="weights of a training checkpoint (auto: EMA when present)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--budget", type=float, default=None, metavar="GFLOPS",
                       help="average GFLOPs per image; thresholds fitted on the calibration data")
    which.add_argument("--thresholds", type=float, nargs="+", default=None, metavar="T",
                       help="confidence thresholds of the exits (all but the last, or all)")
    which.add_argument("--budget_index", type=int, default=None, metavar="P",
                       help="row P (1-based) of the checkpoint's dynamic_threshold")
    p.add_argument("--calib_split", default=None,
                   help="split whose images fit the --budget thresholds (default: the shown split)")
    p.add_argument("--calib_size", type=int, default=5000, help="images of --calib_split used (seeded subset)")
    p.add_argument("--out", default="exits.png", help="PNG to write (default: exits.png)")
    p.add_argument("--per_exit", type=int, default=16, help="images shown per exit (default: 16)")
    p.add_argument("--columns", type=int, default=4, help="images per row in each exit's panel (default: 4)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="data loading processes (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shown sample and the calibration subset")
    p.add_argument("--dpi", type=int, default=150)
    return p


def check_args(args: argparse.Namespace) -> None:
    for name in ("per_exit", "columns", "batch_size", "calib_size", "dpi"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {args.workers}")
    if args.img_size is not None and args.img_size < 1:
        raise ConfigError(f"--img_size must be positive, got {args.img_size}")
    if not 0 < args.crop_pct <= 1:
        raise ConfigError(f"--crop_pct must be in (0, 1], got {args.crop_pct}")
    if args.budget is not None and args.budget <= 0:
        raise ConfigError(f"--budget must be positive, got {args.budget}")
    if not Path(args.out).suffix.lower() == ".png":
        raise ConfigError(f"--out must name a .png file, got {args.out}")


def visualize(args: argparse.Namespace) -> dict[str, Any]:
    """The body of the command: returns the numbers it prints."""
    check_args(args)
    checkpoint = load_checkpoint_file(args.checkpoint_path)
    overrides = {} if args.img_size is None else {"img_size": args.img_size}
    model, _ = build_from_checkpoint(checkpoint, args.checkpoint_path, name=args.model, weights=args.weights,
                                     **overrides)
    size = model.img_size
    cfg = model.pretrained_cfg
    transform = eval_transform(size, args.crop_pct, cfg["mean"], cfg["std"])
    dataset = build_split(args.data_url, args.split, transform)
    numbered = label_numbered_folders(dataset, checkpoint.get("class_names"), args.split)
    if numbered:
        print(numbered)
    loader = make_loader(dataset, None, args.batch_size, args.workers, persistent=False)
    flops = exit_gflops(model, size)
    thresholds, source = resolve_thresholds(args, model, checkpoint, loader, transform, flops)
    run = collect_early_exit(model, loader, thresholds)

    num_exits = model.num_exits
    shares = exit_shares(run.exit_index, num_exits)
    accuracy = [_exit_accuracy(run, k) for k in range(num_exits)]
    gflops = expected_gflops(shares, flops)
    top1 = float((run.prediction == run.targets).float().mean()) * 100
    threshold_text = ", ".join(format_threshold(t) for t in thresholds[:-1].tolist())
    suptitle = (f"{getattr(model, 'model_name', 'DVT')} on {Path(args.data_url).name}/{args.split} "
                f"({len(dataset)} images), {source}: {top1:.1f}% at {gflops:.3g} GFLOPs per image "
                f"({gflops / flops[-1] * 100:.0f}% of the last exit's {flops[-1]:.3g})\n"
                f"thresholds {threshold_text}; shown: up to {args.per_exit} random images per exit, "
                f"caption: prediction, confidence (true class if wrong); frame: right (green) / wrong (red)")
    out = save_figure(draw_run(args, model, dataset, run, shares, accuracy, suptitle), args.out, dpi=args.dpi)

    for k, (share, acc) in enumerate(zip(shares, accuracy)):
        acc_text = "-" if np.isnan(acc) else f"{acc:.2f}%"
        print(f"exit {k + 1} ({model.grids[k]}x{model.grids[k]} tokens): {share * 100:.1f}% of images, "
              f"accuracy {acc_text}")
    print(f"overall: {top1:.2f}% at {gflops:.4g} GFLOPs per image ({source}; thresholds {threshold_text}); "
          f"wrote {out}")
    return dict(thresholds=thresholds.tolist(), exit_shares=shares, exit_top1=accuracy,
                top1=top1, gflops=gflops, flops=list(flops), exit_index=run.exit_index.tolist(), out=str(out))


def draw_run(args: argparse.Namespace, model: DVT, dataset: Any, run: EarlyExitRun, shares: Sequence[float],
             accuracy: Sequence[float], suptitle: str) -> Figure:
    """The picture of ``run``: per exit, up to ``--per_exit`` of its images as the eye sees
    them (before normalisation), under a title with its grid, share, accuracy and, for a
    generated dataset, the mean difficulty of its images."""
    size = model.img_size
    difficulty = _difficulties(args.data_url, dataset.samples)
    picked = pick_examples(run, model.num_exits, args.per_exit, args.seed)
    display = transforms.Compose([
        transforms.Resize(int(size / args.crop_pct), interpolation=InterpolationMode.BICUBIC),
        transforms.CenterCrop(size)])
    images, labels, correct, titles = [], [], [], []
    for k in range(model.num_exits):
        images.append([np.asarray(display(dataset.loader(dataset.samples[i][0]))) for i in picked[k]])
        labels.append([_caption(dataset.classes, int(run.prediction[i]), int(run.targets[i]), float(run.confidence[i]))
                       for i in picked[k]])
        correct.append([bool(run.prediction[i] == run.targets[i]) for i in picked[k]])
        grid = model.grids[k]
        title = f"Exit {k + 1}: {grid}x{grid} tokens\n{shares[k] * 100:.1f}% of images, "
        title += "accuracy -" if np.isnan(accuracy[k]) else f"accuracy {accuracy[k]:.1f}%"
        if difficulty is not None and shares[k] > 0:
            title += f"\nmean difficulty {difficulty[(run.exit_index == k).numpy()].mean():.2f}"
        titles.append(title)
    return draw_exits(images, labels, correct, titles, suptitle, args.columns)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; returns 0 when done, 1 for a data or checkpoint error, 2 for bad
    options (one line on stderr)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    return run_command(lambda: visualize(args))


if __name__ == "__main__":
    sys.exit(main())

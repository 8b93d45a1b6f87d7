"""Export the stages of a DVT cascade with ``torch.export`` and run real early exit from them.

    python scripts/export_stages.py --model DVT_tiny --img-size 64 --out exported/DVT_tiny
    python scripts/export_stages.py --model DVT_T2t_vit_12 --checkpoint DVT_T2t_vit_12.pth.tar --out exported/t2t12 \\
        --thresholds 0.8 0.7 0 --dtype bf16
    python scripts/export_stages.py --checkpoint output/train/run/best.pth.tar --out exported/run

The model is rebuilt from the checkpoint (:func:`utils.checkpoint.weights.build_from_checkpoint`:
its classes, and its name and image size where it records them, as this project's files and
model folders do); ``--model`` and ``--img-size`` are then needed only for files that do not
say them (the released ``.pth.tar`` files), and must agree with those that do.

Each stage (:class:`models.dvt.ExitStep`) is exported with a dynamic batch and saved as
``OUT/stage0.pt2``, ``stage1.pt2``, ...; the programs are then read back and run with real
early exit (:func:`models.dvt.run_early_exit`: the samples that go on are gathered between
the programs) on a batch of random images, and checked against the eager model. Deployment
needs only the ``.pt2`` files, torch and ``run_early_exit``'s dozen lines.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import DVT, build_dvt  # noqa: E402
from models.deploy import export_stages, load_stages, save_stages  # noqa: E402
from models.dvt import run_early_exit  # noqa: E402
from models.registry import MODEL_CFGS  # noqa: E402
from utils.budget.thresholds import find_budget_thresholds  # noqa: E402
from utils.checkpoint.files import load_checkpoint_file  # noqa: E402
from utils.checkpoint.weights import build_from_checkpoint  # noqa: E402
from utils.errors import CheckpointError, ConfigError  # noqa: E402
from utils.run.preflight import check_output_folder  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_IMG_SIZE = 224


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help=f"registered DVT model ({', '.join(MODEL_CFGS)}); default: the checkpoint's own")
    parser.add_argument("--checkpoint", default=None,
                        help="weights: a checkpoint file (released or ours) or a model folder (default: seeded "
                             "random weights)")
    parser.add_argument("--img-size", type=int, default=None,
                        help=f"input size; default: the checkpoint's own, else {DEFAULT_IMG_SIZE}")
    parser.add_argument("--dtype", default="fp32", choices=tuple(DTYPES), help="weights converted once to this dtype")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", required=True, type=Path, help="folder for stage0.pt2, stage1.pt2, ...")
    parser.add_argument("--batch", type=int, default=8, help="images of the test run (and the export example)")
    parser.add_argument("--thresholds", nargs="+", type=float, default=None,
                        help="one confidence threshold per exit (default: fitted on the test batch to the "
                             "exit shares of budget row --budget-index)")
    parser.add_argument("--budget-index", type=int, default=10, help="budget row p (1..59) for fitted thresholds")
    args = parser.parse_args(argv)
    if args.batch < 2:
        parser.error("--batch must be at least 2 (the export example)")
    if args.model is None and args.checkpoint is None:
        parser.error("--model is needed without --checkpoint")
    if args.img_size is not None and args.img_size < 1:
        parser.error(f"--img-size must be positive, got {args.img_size}")
    return args


def stored_img_size(checkpoint: dict) -> Optional[int]:
    """The image size a checkpoint records (this project's files and model folders), if any."""
    size = (checkpoint.get("model_kwargs") or {}).get("img_size") if checkpoint.get("model_name") else None
    return size if isinstance(size, int) else None


def build_model(args: argparse.Namespace) -> DVT:
    """--model with seeded random weights, or the model of --checkpoint with its weights.

    Raises:
        ConfigError: an unknown --model.
        CheckpointError: a checkpoint that cannot be read, or that disagrees with --model or
            --img-size.
    """
    if args.model is not None and args.model not in MODEL_CFGS:
        raise ConfigError(f"unknown model {args.model!r}; choose one of: {', '.join(MODEL_CFGS)}")
    torch.manual_seed(0)
    if not args.checkpoint:
        return build_dvt(args.model, img_size=args.img_size or DEFAULT_IMG_SIZE).eval()
    checkpoint = load_checkpoint_file(args.checkpoint)
    stored = stored_img_size(checkpoint)
    if stored is not None and args.img_size not in (None, stored):
        raise CheckpointError(f"{args.checkpoint} was trained at --img-size {stored}, but --img-size is "
                              f"{args.img_size}; drop --img-size or pass --img-size {stored}")
    defaults = {"img_size": args.img_size} if args.img_size is not None else None
    model, _ = build_from_checkpoint(checkpoint, args.checkpoint, name=args.model, defaults=defaults)
    if not isinstance(model, DVT):
        raise CheckpointError(f"{args.checkpoint} holds a single-exit {type(model).__name__}; export_stages.py "
                              f"exports DVT cascades ({', '.join(MODEL_CFGS)})")
    return model


@torch.no_grad()
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    try:
        model = build_model(args)
        if args.thresholds is not None and len(args.thresholds) != model.num_exits:
            raise ConfigError(f"--thresholds needs {model.num_exits} values, got {len(args.thresholds)}")
        check_output_folder(args.out, flag="--out")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    model.to(device=device, dtype=DTYPES[args.dtype])
    x = torch.randn(args.batch, 3, model.img_size, model.img_size, device=device)
    if args.thresholds is not None:
        thresholds = torch.tensor(args.thresholds)
    else:
        conf = torch.stack(model(x)).float().softmax(-1).amax(-1).cpu()  # (E, B)
        thresholds = find_budget_thresholds(conf, [args.budget_index])[0]

    start = time.perf_counter()
    paths = save_stages(export_stages(model, x), args.out)
    print(f"exported {len(paths)} stages in {time.perf_counter() - start:.1f} s: {', '.join(map(str, paths))}")
    steps = load_stages(args.out)
    thresholds = thresholds.to(device)
    exported = run_early_exit(steps, x, thresholds)
    start = time.perf_counter()
    exported = run_early_exit(steps, x, thresholds)
    t_exported = time.perf_counter() - start
    start = time.perf_counter()
    eager = model.forward_early_exit(x, thresholds)
    t_eager = time.perf_counter() - start
    counts = torch.bincount(exported.exit_index.cpu(), minlength=model.num_exits).tolist()
    diff = (exported.logits.float() - eager.logits.float()).abs().max().item()
    same = bool(torch.equal(exported.exit_index, eager.exit_index))
    print(f"thresholds {[round(t, 4) for t in thresholds.tolist()]}: images per exit {counts}")
    print(f"exported stages: {t_exported * 1e3:.1f} ms, eager: {t_eager * 1e3:.1f} ms for {args.batch} images; "
          f"same exits as eager: {same}, largest logit difference {diff:.2e}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

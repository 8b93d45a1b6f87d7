"""Export a DVT checkpoint's stages to ONNX, for real early exit in ONNX Runtime.

    python scripts/export_onnx.py --checkpoint_path DVT_T2t_vit_12.pth.tar --out exported/t2t12
    python scripts/export_onnx.py --checkpoint_path run/released.pth.tar --out exported/tiny --img-size 64

The checkpoint is read as :meth:`utils.predict.DVTClassifier.from_checkpoint` reads it (model,
class names, GFLOPs per exit, default thresholds). Each stage (:class:`models.dvt.ExitStep`) is
written as ``OUT/stage0.onnx``, ``stage1.onnx``, ... with a dynamic batch
(:mod:`models.deploy_onnx`), then run in ONNX Runtime on random images and compared with eager
PyTorch: the largest differences of the logits and confidences are
printed, and an export beyond ``--tolerance`` is refused (status 1, no JSON written, so the
folder cannot be loaded). ``OUT/dvt_onnx.json`` keeps the model name, exits, image size,
preprocessing, cumulative GFLOPs per exit, class names and the checkpoint's stored thresholds
and budget table (:mod:`utils.predict.onnx_runtime`), so that the folder classifies without
the checkpoint::

    from utils.predict import DVTClassifier
    clf = DVTClassifier.from_onnx("exported/t2t12", budget=1.5)

Needs onnx, onnxscript and onnxruntime: ``pip install -r requirements-deploy.txt``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.deploy_onnx import DEFAULT_OPSET, export_onnx_stages, onnx_stage_files  # noqa: E402
from models.dvt import DVT  # noqa: E402
from utils.checkpoint import load_checkpoint_file  # noqa: E402
from utils.errors import CheckpointError, ConfigError, one_line  # noqa: E402
from utils.predict import DVTClassifier  # noqa: E402
from utils.predict.onnx_runtime import (FOLDER_JSON, OnnxCascade, folder_info, load_steps,  # noqa: E402
                                        require_onnx_export, require_onnxruntime, write_folder_info)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_path", "--checkpoint-path", required=True,
                        help="checkpoint (this project's or the released layout)")
    parser.add_argument("--out", required=True, type=Path, help=f"folder for stage0.onnx, ... and {FOLDER_JSON}")
    parser.add_argument("--model", default=None, help="model name, for files that do not store theirs "
                                                      "(default: found from the weights' layout)")
    parser.add_argument("--img-size", "--img_size", dest="img_size", type=int, default=None,
                        help="input resolution (default: the checkpoint's, else 224)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default: {DEFAULT_OPSET})")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest difference from eager PyTorch accepted on logits and confidences (default: 1e-4)")
    parser.add_argument("--check-batch", type=int, default=8, help="random images of the check (default: 8)")
    parser.add_argument("--threads", type=int, default=None, help="threads of torch and of the check's sessions")
    args = parser.parse_args(argv)
    if args.check_batch < 2:
        parser.error("--check-batch must be at least 2")
    if args.img_size is not None and args.img_size < 1:
        parser.error(f"--img-size must be positive, got {args.img_size}")
    return args


def load_cascade(args: argparse.Namespace) -> tuple[DVTClassifier, dict]:
    """The checkpoint as :meth:`DVTClassifier.from_checkpoint` reads it (model with its class
    names, GFLOPs per exit, default thresholds), and the checkpoint itself (its stored
    thresholds and budget table go into the JSON)."""
    clf = DVTClassifier.from_checkpoint(args.checkpoint_path, model=args.model, img_size=args.img_size)
    if not isinstance(clf.model, DVT):
        raise ConfigError(f"{args.checkpoint_path} holds a single-exit model; only DVT cascades export stage by stage")
    clf.model.float()
    return clf, load_checkpoint_file(args.checkpoint_path)


def clear_folder(folder: Path, num_exits: int) -> None:
    """Remove the JSON and stage files of an earlier export that this one would not replace."""
    (folder / FOLDER_JSON).unlink(missing_ok=True)
    k = num_exits
    while (stale := onnx_stage_files(folder, k + 1)[-1]).exists():
        stale.unlink()
        k += 1


@torch.no_grad()
def compare_stages(model: DVT, cascade_steps: Sequence, x: torch.Tensor) -> list[tuple[float, float]]:
    """Largest |ONNX - eager| of the logits and of the confidences of every stage, each stage
    fed the eager carry of the previous one."""
    diffs, carry = [], ()
    for step, onnx_step in zip(model.exit_steps(), cascade_steps):
        want, got = step(x, *carry), onnx_step(x, *carry)
        diffs.append(tuple((g - w).abs().max().item() for g, w in zip(got[:2], want[:2])))
        carry = want[2:]
    return diffs


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        require_onnx_export()
        require_onnxruntime()
        if args.threads:
            torch.set_num_threads(args.threads)
        clf, checkpoint = load_cascade(args)
        model, choice = clf.model, clf.choice
        args.out.mkdir(parents=True, exist_ok=True)
        clear_folder(args.out, model.num_exits)
        generator = torch.Generator().manual_seed(0)
        size = (3, model.img_size, model.img_size)
        start = time.perf_counter()
        paths = export_onnx_stages(model, torch.randn(2, *size, generator=generator), args.out, args.opset)
        print(f"exported {len(paths)} stages of {model.model_name} ({model.img_size} px, opset {args.opset}) "
              f"in {time.perf_counter() - start:.1f} s: {', '.join(p.name for p in paths)}")

        info = folder_info(model, checkpoint, clf.flops, args.opset)
        x = torch.randn(args.check_batch, *size, generator=generator)
        steps = load_steps(paths, providers=["cpu"], threads=args.threads)
        worst = 0.0
        for k, (d_logits, d_conf) in enumerate(compare_stages(model, steps, x)):
            print(f"stage{k}.onnx vs eager on {args.check_batch} random images: max |logits diff| {d_logits:.2e}, "
                  f"max |confidence diff| {d_conf:.2e}")
            worst = max(worst, d_logits, d_conf)
        if not worst <= args.tolerance:
            raise ConfigError(f"the ONNX stages differ from PyTorch by {worst:.2e}, above --tolerance "
                              f"{args.tolerance:g}; {args.out} is left without {FOLDER_JSON}")
        path = write_folder_info(args.out, info)
        cascade = OnnxCascade(args.out, providers=["cpu"], threads=args.threads)
        got = cascade.forward_early_exit(x, choice.thresholds)
        want = model.forward_early_exit(x, choice.thresholds)
        same = int((got.exit_index == want.exit_index).sum())
        print(f"early exit with the default {choice.describe()}: {same}/{args.check_batch} random images leave at "
              f"the same exit as in PyTorch")
        print(f"wrote {path}")
    except (CheckpointError, ConfigError, ValueError, OSError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

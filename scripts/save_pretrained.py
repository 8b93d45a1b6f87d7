"""Write a checkpoint as a Hub-style model folder: ``config.json`` + ``model.safetensors``.

    python scripts/save_pretrained.py --checkpoint_path DVT_T2t_vit_12.pth.tar --out hub/DVT_T2t_vit_12
    python scripts/save_pretrained.py --checkpoint_path output/train/run/best.pth.tar --out hub/my_dvt

Any checkpoint this project reads works: a released ``.pth.tar`` (the original files too; the
model is recognised from its weights, or named with --model), a training checkpoint (its EMA
weights when it kept them) or a released file of ours. The folder keeps the weights, the class
names, the preprocessing (``pretrained_cfg``), the reuse switches (``model_args``), the per-exit
GFLOPs, anytime accuracy, thresholds and budget table. It loads with

    import models, timm
    model = timm.create_model("local-dir:hub/DVT_T2t_vit_12", pretrained=True)

and ``inference.py --checkpoint_path hub/DVT_T2t_vit_12`` / ``DVTClassifier.from_checkpoint``
read it as they read a ``.pth.tar``. Exit status: 0 written; 1 an unreadable checkpoint or a
refused write; 2 bad options.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.factory import is_cascade_name  # noqa: E402
from utils.checkpoint.files import load_checkpoint_file  # noqa: E402
from utils.checkpoint.hub import save_model_folder  # noqa: E402
from utils.checkpoint.model_folder import CONFIG_FILE, WEIGHTS_FILE  # noqa: E402
from utils.checkpoint.weights import build_from_checkpoint  # noqa: E402
from utils.data.classes import attach_class_names  # noqa: E402
from utils.errors import CheckpointError, CheckpointWriteError, one_line  # noqa: E402


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_path", "--checkpoint-path", required=True, type=Path,
                        help="a .pth.tar checkpoint (released, training or ours)")
    parser.add_argument("--out", required=True, type=Path, help=f"folder to write ({CONFIG_FILE} + {WEIGHTS_FILE})")
    parser.add_argument("--model", default=None,
                        help="model name, for files that do not name theirs and whose weights fit several models")
    parser.add_argument("--weights", default="auto", choices=("auto", "model", "ema"),
                        help="which weights of a training checkpoint (default: EMA when kept)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out when it exists and is not empty")
    args = parser.parse_args(argv)
    if args.model is not None and not is_cascade_name(args.model):
        parser.error(f"--model {args.model}: unknown model")
    out = args.out
    if out.exists() and not args.overwrite and (not out.is_dir() or any(out.iterdir())):
        parser.error(f"--out {out} exists and is not empty; pass another folder or --overwrite")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    source = str(args.checkpoint_path)
    try:
        checkpoint = load_checkpoint_file(args.checkpoint_path)
        model, which = build_from_checkpoint(checkpoint, source, name=args.model, weights=args.weights)
        attach_class_names(model, checkpoint, source)
        folder = save_model_folder(model, checkpoint, args.out, overwrite=args.overwrite)
    except (CheckpointError, CheckpointWriteError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    names = (model.pretrained_cfg or {}).get("label_names")
    print(f"wrote {folder}: {model.model_name}, {model.num_exits} exits, {model.num_classes} classes"
          f"{' with names' if names else ''}, {which} weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())

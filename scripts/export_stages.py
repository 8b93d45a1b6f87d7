"""Export the stages of a DVT cascade with ``torch.export`` and run real early exit from them.

    python scripts/export_stages.py --model DVT_tiny --img-size 64 --out exported/DVT_tiny
    python scripts/export_stages.py --model DVT_T2t_vit_12 --checkpoint DVT_T2t_vit_12.pth.tar --out exported/t2t12 \\
        --thresholds 0.8 0.7 -1e8 --dtype bf16

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

from models import build_dvt  # noqa: E402
from models.deploy import export_stages, load_stages, save_stages  # noqa: E402
from models.dvt import run_early_exit  # noqa: E402
from utils.budget.thresholds import find_budget_thresholds  # noqa: E402
from utils.checkpoint.weights import load_checkpoint  # noqa: E402
from utils.errors import CheckpointError  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="registered DVT model name")
    parser.add_argument("--checkpoint", default=None, help="weights (released or ours; default: seeded random weights)")
    parser.add_argument("--img-size", type=int, default=224)
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
    if args.checkpoint and not Path(args.checkpoint).is_file():
        parser.error(f"--checkpoint {args.checkpoint}: no such file")
    return args


@torch.no_grad()
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_dvt(args.model, img_size=args.img_size).eval()
    if args.checkpoint:
        try:
            load_checkpoint(model, args.checkpoint)
        except CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    model.to(device=device, dtype=DTYPES[args.dtype])
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    if args.thresholds is not None:
        if len(args.thresholds) != model.num_exits:
            print(f"error: --thresholds needs {model.num_exits} values, got {len(args.thresholds)}", file=sys.stderr)
            return 1
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

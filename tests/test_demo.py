"""The demo (scripts/demo.py) end to end, in its quick setting, and its budget choice."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from helpers import REPO

sys.path.insert(0, str(REPO / "scripts"))
import demo  # noqa: E402


def test_matching_budget_is_the_cheapest_point_within_tolerance():
    gflops = [1.0, 2.0, 3.0, 4.0]
    top1 = [70.0, 79.6, 80.5, 80.0]
    assert demo.matching_budget(gflops, top1, last_top1=80.0, tolerance=0.5) == 1
    assert demo.matching_budget(gflops, top1, last_top1=80.0, tolerance=0.0) == 2
    assert demo.matching_budget(gflops, top1, last_top1=81.0, tolerance=0.4) is None
    # the curve's GFLOPs need not be sorted: the cheapest qualifying point wins
    assert demo.matching_budget([3.0, 1.5, 2.0], [80.0, 80.0, 80.0], 80.0, 0.5) == 1


def test_quick_demo_runs_every_step_and_writes_its_outputs(tmp_path):
    out, data = tmp_path / "out", tmp_path / "data"
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py"), "--quick", "--output", str(out), "--data", str(data),
         "--threads", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "demo.json").read_text())
    for key in ("plot", "results", "exits", "checkpoint"):
        assert Path(summary["outputs"][key]).is_file(), key
    with Image.open(out / "exits.png") as img, Image.open(out / "accuracy_vs_gflops.png") as plot:
        assert img.format == plot.format == "PNG"

    results = json.loads((out / "results.json").read_text())
    gflops, top1 = results["budgeted_batch_classification"]
    assert len(gflops) == 59
    index = summary["budget_index"] - 1
    assert summary["matched_gflops"] == gflops[index] and summary["matched_top1"] == top1[index]
    anytime = results["anytime_classification"]
    if summary["matched_top1"] >= anytime[-1] - summary["tolerance_points"]:  # the chosen point is the cheapest one
        assert all(g >= gflops[index] for g, t in zip(gflops, top1) if t >= anytime[-1] - summary["tolerance_points"])
    assert summary["gflops_fraction_of_last_exit"] == pytest.approx(gflops[index] / results["flops"][-1])
    # real early exit at that budget answers as the simulation does
    assert summary["early_exit_top1"] == pytest.approx(summary["matched_top1"])
    assert sum(summary["exit_shares"]) == pytest.approx(1.0)
    assert "what DVT did" in done.stdout and "python main.py" in done.stdout and "python inference.py" in done.stdout

    # the dataset is cached: a second run draws nothing
    again = subprocess.run(
        [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import demo; "
         "from utils.data.synthetic import make_shapes_dataset; "
         "print(make_shapes_dataset(sys.argv[2], **dict(demo.DEMO_DATA, **demo.QUICK['data'])).created)",
         str(REPO / "scripts"), str(data)], cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.strip() == "False"

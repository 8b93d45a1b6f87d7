"""scripts/compare_runs.py: runs (results.json of inference.py --output, their folders, checkpoints
with results) on one plot and in one table: each exit, the best budget, the most accurate budget
within a cost, the cheapest budget reaching an accuracy; bad input refused in one line."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from PIL import Image

from helpers import REPO
from utils.budget.choice import best_row_within, cheapest_row_reaching

sys.path.insert(0, str(REPO / "scripts"))
import compare_runs  # noqa: E402

FULL = {"model_name": "DVT_T2t_vit_12", "num_validation": 500, "flops": [0.47, 1.46, 3.5],
        "anytime_classification": [69.1, 75.7, 80.0],
        "budgeted_batch_classification": [[0.6, 1.0, 1.4, 2.0, 3.0], [72.0, 76.5, 78.0, 79.6, 80.1]]}
ABLATED = {"model_name": "DVT_T2t_vit_12", "num_validation": 500, "flops": [0.47, 1.44, 3.4],
           "anytime_classification": [68.0, 73.9, 78.8],
           "budgeted_batch_classification": [[0.7, 1.2, 2.5], [70.5, 74.0, 78.7]]}


def test_rows_within_a_cost_and_reaching_an_accuracy():
    gflops, top1 = [1.0, 2.0, 3.0, 2.0], [70.0, 75.0, 74.0, 75.0]
    assert best_row_within(gflops, top1, 2.5) == 1  # ties: the earlier
    assert best_row_within(gflops, top1, 0.5) is None
    assert cheapest_row_reaching(gflops, top1, 74.0) == 1  # 2.0 GFLOPs at 75 beats 3.0 at 74
    assert cheapest_row_reaching(gflops, top1, 75.5) is None


def test_runs_are_compared_in_one_table_and_one_plot(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "results.json").write_text(json.dumps(FULL))
    (tmp_path / "no_reuse.json").write_text(json.dumps(ABLATED))
    torch.save({**FULL, "model_state_dict": {}}, tmp_path / "DVT_T2t_vit_12.pth.tar")  # a released file
    out = tmp_path / "plots" / "compare.png"
    assert compare_runs.main([str(tmp_path / "full"), f"ablated={tmp_path / 'no_reuse.json'}",
                              str(tmp_path / "DVT_T2t_vit_12.pth.tar"), "--at", "1.3", "0.5", "--reach", "78",
                              "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| run | model | exits top-1 (%) | exits GFLOPs | best budgeted top-1 (GFLOPs) | "
                               "top-1 within 1.3 GFLOPs | top-1 within 0.5 GFLOPs | GFLOPs for 78% top-1 |")
    assert lines[2] == ("| full | DVT_T2t_vit_12 | 69.10 / 75.70 / 80.00 | 0.47 / 1.46 / 3.5 | 80.10 (3) | "
                        "76.50 (1) | - | 1.4 (78.00%) |")
    assert lines[3] == "| ablated | DVT_T2t_vit_12 | 68.00 / 73.90 / 78.80 | 0.47 / 1.44 / 3.4 | 78.70 (2.5) | " \
                       "74.00 (1.2) | - | 2.5 (78.70%) |"
    assert lines[4].startswith("| DVT_T2t_vit_12 | DVT_T2t_vit_12 | 69.10")  # a checkpoint: named by its file
    assert lines[-1] == f"wrote {out}"
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > 400


@pytest.mark.parametrize("case, status, message", [
    ("missing", 1, "missing.json: no such file"),
    ("no results", 1, "has no 'flops', 'anytime_classification', 'budgeted_batch_classification'"),
    ("not json", 1, "is not readable JSON"),
    ("same labels", 2, "two runs are labelled alike"),
    ("bad out", 2, "--out must name a .png, .pdf or .svg file"),
])
def test_bad_input_is_one_line_and_writes_nothing(case, status, message, tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text(json.dumps(FULL))
    (tmp_path / "train.json").write_text(json.dumps({"epoch": 3}))
    (tmp_path / "broken.json").write_text("{")
    runs = {"missing": [str(tmp_path / "missing.json")], "no results": [str(tmp_path / "train.json")],
            "not json": [str(tmp_path / "broken.json")], "same labels": [str(tmp_path / "a"), f"a={tmp_path / 'a'}"],
            "bad out": [str(tmp_path / "a")]}[case]
    out = tmp_path / ("compare.jpg" if case == "bad out" else "compare.png")
    assert compare_runs.main([*runs, "--out", str(out)]) == status
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not out.exists()


def test_a_plot_that_fails_halfway_leaves_the_last_whole_one(tmp_path, monkeypatch, capsys):
    """The plot is drawn into a temporary file of this process and renamed over ``--out``: a
    failure while drawing (a full disk) leaves the plot of the run before, whole, and no
    temporary file; a second run replaces it."""
    from matplotlib.figure import Figure
    (tmp_path / "results.json").write_text(json.dumps(FULL))
    out = tmp_path / "compare.png"
    assert compare_runs.main([str(tmp_path / "results.json"), "--out", str(out)]) == 0
    first = out.read_bytes()
    Image.open(out).verify()
    real = Figure.savefig

    def full_disk(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(first[:100])  # half an image, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full_disk)
    with pytest.raises(OSError, match="No space left"):
        compare_runs.compare(compare_runs.build_parser().parse_args(
            [str(tmp_path / "results.json"), "--out", str(out), "--title", "other"]))
    assert out.read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare.png", "results.json"]
    monkeypatch.setattr(Figure, "savefig", real)
    assert compare_runs.main([str(tmp_path / "results.json"), "--out", str(out), "--title", "other"]) == 0
    assert out.read_bytes() != first
    Image.open(out).verify()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare.png", "results.json"]

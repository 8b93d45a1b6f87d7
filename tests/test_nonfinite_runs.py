"""Non-finite losses in whole runs: an injected NaN is skipped on every rank and counted, and k
non-finite steps in a row stop the run with the last good checkpoint kept."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import main as train_main
from helpers import EXACT, REPO, SUBPROCESS_ENV, main_args, read_summary
from utils.checkpoint.files import load_checkpoint_file

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_injected_nan_is_skipped_on_every_rank_and_counted(tmp_path, image_data):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "main.py"), *main_args(image_data, tmp_path, *EXACT, "--epochs", "1", "--batch-size", "4",
                                             "--inject-nonfinite", "0:1@1")]
    done = subprocess.run(cmd, cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "skipped 1 step(s) with a non-finite loss" in done.stdout
    folder = tmp_path / "train" / "run"
    row = read_summary(folder / "summary.csv")[0]
    assert row["train_skipped_steps"] == "1" and float(row["train_loss"]) == float(row["train_loss"])  # not NaN
    last = load_checkpoint_file(folder / "last.pth.tar")
    assert last["num_updates"] == 3 and all(torch.isfinite(v).all() for v in last["model"].values()
                                             if v.is_floating_point())


def test_k_consecutive_nan_steps_stop_with_the_last_good_checkpoint(tmp_path, image_data, capsys):
    args = main_args(image_data, tmp_path, *EXACT, "--inject-nonfinite", "1:0", "1:1", "--max-bad-steps", "2")
    assert train_main.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: 2 training steps in a row had a non-finite loss"), err
    assert "last good checkpoint" in err[0]
    last = load_checkpoint_file(tmp_path / "train" / "run" / "last.pth.tar")
    assert (last["epoch"], last["step"], last["num_updates"]) == (1, 0, 3)  # written after epoch 0, untouched
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())

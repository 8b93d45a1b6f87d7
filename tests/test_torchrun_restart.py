"""torchrun restarts: after a worker is killed, the restarted workers find their run folder
(no --experiment, no --resume), resume from the last recovery checkpoint and end with the
weights of an uninterrupted run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import EXACT, REPO, SUBPROCESS_ENV, child_pids, main_args, only_folder, read_summary, same_weights, untimed
from utils.checkpoint.files import load_checkpoint_file


def torchrun(data: Path, out: Path, *extra: str, restarts: int = 0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", str(restarts), str(REPO / "main.py"),
           *main_args(data, out, *EXACT, "--epochs", "2", "--batch-size", "4", "--recovery-interval", "1",
                      experiment=""), *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds torchrun's workers through /proc")
def test_kill_9_of_a_worker_under_torchrun_restart_resumes_bitwise(tmp_path, image_data):
    """A worker killed by SIGKILL in the second epoch: torchrun restarts both, they find the run
    folder, resume and end bit for bit where a run without the kill ends."""
    straight = torchrun(image_data, tmp_path / "straight")
    log, _ = straight.communicate(timeout=600)
    assert straight.returncode == 0, log
    reference = only_folder(tmp_path / "straight")

    run = torchrun(image_data, tmp_path / "killed", restarts=1)
    seen = []
    for line in run.stdout:
        seen.append(line)
        if "train 1 [    2/3]" in line:
            workers = child_pids(run.pid)
            assert len(workers) == 2, workers
            os.kill(workers[-1], signal.SIGKILL)
            break
    rest, _ = run.communicate(timeout=600)
    log = "".join(seen) + rest
    assert run.returncode == 0, log
    assert "resumed" in log and log.count("train 1 [    3/3]") >= 1
    folder = only_folder(tmp_path / "killed")
    assert folder.name == reference.name  # derived from the settings, found again by the new round
    assert same_weights(load_checkpoint_file(folder / "last.pth.tar"), load_checkpoint_file(reference / "last.pth.tar"))
    assert untimed(read_summary(folder / "summary.csv")) == untimed(read_summary(reference / "summary.csv"))

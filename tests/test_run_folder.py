"""One run per folder: a held run folder is refused (and its lock dies with its holder),
timestamped folders never collide, and two runs started together into one folder leave one
winner."""
from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import REPO, SUBPROCESS_ENV, error_line, quick_args, run_main, snapshot
from utils.checkpoint.files import load_checkpoint_file
from utils.run.folder import RUN_LOCK, RunLock, RunLockedError, create_unique_folder

pytestmark = pytest.mark.usefixtures("one_thread")

HOLD_LOCK = ("import sys, time; sys.path.insert(0, sys.argv[1]); from utils.run.folder import RunLock; "
             "lock = RunLock(sys.argv[2]).acquire(); print('locked', flush=True); time.sleep(60)")


def test_a_held_run_folder_is_refused_and_the_lock_dies_with_its_holder(small_data, tmp_path, capsys):
    folder = tmp_path / "out" / "train" / "run"
    folder.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(REPO), str(folder)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(tmp_path / "out")
        code, _, err = run_main(capsys, quick_args(small_data, tmp_path / "out"))
        line = error_line(err)
        assert code == 2
        assert "in use by another run" in line and f"pid {holder.pid}" in line and "host " in line, line
        assert snapshot(tmp_path / "out") == before  # no config.yaml, log.txt or checkpoint of the refused run
    finally:
        holder.kill()  # kill -9: the kernel releases the flock with the process
        holder.wait()
    with RunLock(folder) as lock:
        assert lock.held
        with pytest.raises(RunLockedError):
            RunLock(folder).acquire()
    assert (folder / RUN_LOCK).is_file()


def test_timestamped_run_folders_never_collide(tmp_path):
    made = [create_unique_folder(tmp_path / "train", "20260101-000000-DVT_tiny-32") for _ in range(3)]
    assert len(set(made)) == 3 and all(p.is_dir() for p in made)
    assert made[0].name == "20260101-000000-DVT_tiny-32"


@pytest.mark.slow
def test_two_runs_started_together_into_one_folder(small_data, tmp_path):
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, str(REPO / "main.py"),
                               *quick_args(small_data, out, "--seed", str(seed), "--no-release")],
                              env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (1, 2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code != 0)
    assert "in use by another run" in error_line(loser) or "already holds a run" in error_line(loser)
    saved = load_checkpoint_file(out / "train" / "run" / "last.pth.tar")
    winner_seed = saved["config"]["seed"]
    assert f"seed: {winner_seed}" in (out / "train" / "run" / "config.yaml").read_text()

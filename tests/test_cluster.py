"""Training at cluster scale, end to end on tiny data: torchrun restarts that resume by
themselves, skipped non-finite steps, unreadable images under the skip policy, tar shards."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import main as train_main
from fake_data import make_image_folder
from utils.checkpoint.files import load_checkpoint_file

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny_cpu.yaml")
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
EXACT = ("--deterministic", "--no-release", "--aa", "none")


pytestmark = pytest.mark.usefixtures("one_thread")


def args_for(data: Path, out: Path, *extra: str, experiment: str = "run") -> list[str]:
    named = ["--experiment", experiment] if experiment else []
    return [str(data), "--config", TINY, "--device", "cpu", "--output", str(out), *named, "--log-interval", "1",
            "--no-progress", *extra]


def summary(folder: Path) -> list[dict[str, str]]:
    with open(folder / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def untimed(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if not k.endswith(("img_per_s", "time_s"))} for r in rows]


def same_state(a: dict, b: dict) -> bool:
    keys = ("model", "model_ema", "epoch", "step", "num_updates")
    return all(k in a and k in b for k in keys) and all(
        torch.equal(a[k][n], b[k][n]) for k in ("model", "model_ema") for n in a[k]) and all(
        a[k] == b[k] for k in ("epoch", "step", "num_updates"))


def only_folder(out: Path) -> Path:
    runs = [p for p in (out / "train").iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


# ------------------------------------------------------------------- torchrun restarts

def torchrun(data: Path, out: Path, *extra: str, restarts: int = 0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", str(restarts), str(REPO / "main.py"),
           *args_for(data, out, *EXACT, "--epochs", "2", "--batch-size", "4", "--recovery-interval", "1",
                     experiment=""), *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def worker_pids(parent: int) -> list[int]:
    """The processes whose parent is ``parent`` (torchrun's workers)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                pids.append(int(entry))
    return sorted(pids)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds torchrun's workers through /proc")
def test_kill_9_of_a_worker_under_torchrun_restart_resumes_bitwise(tmp_path, image_data):
    """A worker killed by SIGKILL in the second epoch: torchrun restarts both, they find the run
    folder (no --experiment, no --resume), resume from the last recovery checkpoint and end
    with the weights of an uninterrupted run."""
    straight = torchrun(image_data, tmp_path / "straight")
    log, _ = straight.communicate(timeout=600)
    assert straight.returncode == 0, log
    reference = only_folder(tmp_path / "straight")

    run = torchrun(image_data, tmp_path / "killed", restarts=1)
    seen = []
    for line in run.stdout:
        seen.append(line)
        if "train 1 [    2/3]" in line:
            workers = worker_pids(run.pid)
            assert len(workers) == 2, workers
            os.kill(workers[-1], signal.SIGKILL)
            break
    rest, _ = run.communicate(timeout=600)
    log = "".join(seen) + rest
    assert run.returncode == 0, log
    assert "resumed" in log and log.count("train 1 [    3/3]") >= 1
    folder = only_folder(tmp_path / "killed")
    assert folder.name == reference.name  # derived from the settings, found again by the new round
    assert same_state(load_checkpoint_file(folder / "last.pth.tar"), load_checkpoint_file(reference / "last.pth.tar"))
    assert untimed(summary(folder)) == untimed(summary(reference))


# ------------------------------------------------------------------- non-finite steps

@pytest.mark.slow
def test_injected_nan_is_skipped_on_every_rank_and_counted(tmp_path, image_data):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "main.py"), *args_for(image_data, tmp_path, *EXACT, "--epochs", "1", "--batch-size", "4",
                                            "--inject-nonfinite", "0:1@1")]
    done = subprocess.run(cmd, cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "skipped 1 step(s) with a non-finite loss" in done.stdout
    folder = tmp_path / "train" / "run"
    row = summary(folder)[0]
    assert row["train_skipped_steps"] == "1" and float(row["train_loss"]) == float(row["train_loss"])  # not NaN
    last = load_checkpoint_file(folder / "last.pth.tar")
    assert last["num_updates"] == 3 and all(torch.isfinite(v).all() for v in last["model"].values()
                                             if v.is_floating_point())


def test_k_consecutive_nan_steps_stop_with_the_last_good_checkpoint(tmp_path, image_data, capsys):
    args = args_for(image_data, tmp_path, *EXACT, "--inject-nonfinite", "1:0", "1:1", "--max-bad-steps", "2")
    assert train_main.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: 2 training steps in a row had a non-finite loss"), err
    assert "last good checkpoint" in err[0]
    last = load_checkpoint_file(tmp_path / "train" / "run" / "last.pth.tar")
    assert (last["epoch"], last["step"], last["num_updates"]) == (1, 0, 3)  # written after epoch 0, untouched
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


# ------------------------------------------------------------------------- bad images

@pytest.fixture()
def data_with_a_bad_file(tmp_path, image_data) -> tuple[Path, Path]:
    root = make_image_folder(tmp_path / "bad_data", num_classes=3, train_per_class=8, val_per_class=4)
    bad = root / "train" / "class_1" / "0003.png"
    bad.write_bytes(bad.read_bytes()[:50])  # truncated
    return root, bad


def test_unreadable_image_stops_by_default(tmp_path, data_with_a_bad_file):
    """With loader workers: one line naming the file, and the process ends (the workers, which
    ignore SIGTERM, are shut down before the interpreter exits)."""
    root, bad = data_with_a_bad_file
    done = subprocess.run([sys.executable, str(REPO / "main.py"),
                           *args_for(root, tmp_path / "out", *EXACT, "--epochs", "1", "--workers", "2")],
                          cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(err) == 1, done.stderr
    assert err[0] == f"error: cannot read image {bad}: image file is truncated", err


def test_unreadable_image_under_skip_policy_costs_one_sample(tmp_path, data_with_a_bad_file, capsys):
    root, bad = data_with_a_bad_file
    out = tmp_path / "out"
    assert train_main.main(args_for(root, out, *EXACT, "--epochs", "2", "--bad-images", "skip",
                                    "--bad-images-max-fraction", "0.05")) == 0
    log = capsys.readouterr().out
    lines = [line for line in log.splitlines() if "skipped an unreadable" in line]
    assert len(lines) == 2 and all(str(bad) in line for line in lines)  # one per epoch
    rows = summary(out / "train" / "run")
    assert [r["train_bad_images"] for r in rows] == ["1", "1"]
    # more than the accepted fraction: the run stops with one line
    assert train_main.main(args_for(root, tmp_path / "out2", *EXACT, "--epochs", "1", "--bad-images", "skip",
                                    "--bad-images-max-fraction", "0.01")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 of the 24 training images could not be read" in err[0], err


# -------------------------------------------------------------------------- tar shards

def tar_copy(folder: Path, dest: Path) -> Path:
    """``dest/train/`` as two tar shards (classes split over them), ``dest/val`` as one ``val.tar``."""
    (dest / "train").mkdir(parents=True)
    classes = sorted(p.name for p in (folder / "train").iterdir())
    for k, part in enumerate((classes[:2], classes[2:])):
        with tarfile.open(dest / "train" / f"shard-{k:03d}.tar", "w") as t:
            for name in part:
                t.add(folder / "train" / name, arcname=name)
    with tarfile.open(dest / "val.tar", "w") as t:
        for name in classes:
            t.add(folder / "val" / name, arcname=name)
    return dest


def test_tar_shards_train_like_the_folder(tmp_path, image_data):
    shards = tar_copy(image_data, tmp_path / "shards")
    extra = (*EXACT, "--epochs", "2")
    assert train_main.main(args_for(image_data, tmp_path / "a", *extra)) == 0
    assert train_main.main(args_for(shards, tmp_path / "b", *extra)) == 0
    a, b = tmp_path / "a" / "train" / "run", tmp_path / "b" / "train" / "run"
    assert untimed(summary(a)) == untimed(summary(b))
    assert same_state(load_checkpoint_file(a / "last.pth.tar"), load_checkpoint_file(b / "last.pth.tar"))


# ---------------------------------------------------------------- one scan, shared

def _list_on_rank_zero(rank: int, port: int, folder: str) -> None:
    """One of two processes: joins a gloo group, lists (pretends to) on rank 0 only."""
    from utils.errors import DataError
    from utils.run.distributed import cleanup_distributed, on_rank_zero, setup_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    setup_distributed("cpu")
    try:
        def scan() -> list[str]:
            (Path(folder) / f"listed-by-{rank}").touch()
            return ["class_0/a.png", "class_1/b.png"]

        (Path(folder) / f"got-{rank}").write_text(",".join(on_rank_zero(scan)))

        def broken() -> None:
            raise DataError("dataset folder not found: /nowhere")

        try:
            on_rank_zero(broken)
        except DataError as e:
            (Path(folder) / f"error-{rank}").write_text(str(e))
    finally:
        cleanup_distributed()


@pytest.mark.slow
def test_the_file_list_is_made_by_rank_0_and_shared(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_list_on_rank_zero, args=(port, str(tmp_path)), nprocs=2)
    assert sorted(p.name for p in tmp_path.glob("listed-by-*")) == ["listed-by-0"]
    assert all((tmp_path / f"got-{r}").read_text() == "class_0/a.png,class_1/b.png" for r in range(2))
    # rank 0's error reaches every rank (none waits for a list that never comes)
    assert all("/nowhere" in (tmp_path / f"error-{r}").read_text() for r in range(2))

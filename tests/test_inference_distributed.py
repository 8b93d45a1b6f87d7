"""inference.py past one process: torchrun runs of the evaluation and of --predict equal the
one-process run (thresholds to the last bit, every row), --predict resumes an interrupted run
to the same bytes and refuses to overwrite, and tar archives are read as sources and splits.

The runs that are compared run in subprocesses with one thread each (two processes share two
cores), so both sides compute with the same kernels."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from test_tar_shards import tar_copy

from helpers import REPO, SUBPROCESS_ENV, error_line, printed_results, run_inference, snapshot
from utils.checkpoint.files import load_checkpoint_file
from utils.data.loader import BatchShardSampler
from utils.predict import job
from utils.predict.resume import KeptRows
from utils.predict.sources import _chunks, iter_image_paths
from utils.run.distributed import DistEnv

TIMEOUT_S = 180
# After this many batches are written, the process writes part of a row and kills itself.
DYING = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import inference
from utils.predict.output import PredictionWriter

write, calls = PredictionWriter.write_many, [0]

def dying(self, rows):
    write(self, rows)
    calls[0] += 1
    if calls[0] == {after}:
        self._file.write("half of a ro")
        self._file.flush()
        os.kill(os.getpid(), signal.SIGKILL)

PredictionWriter.write_many = dying
sys.exit(inference.main())
"""


def launch(*argv, procs: int = 1, script: Path = REPO / "inference.py") -> subprocess.CompletedProcess:
    """``script`` (inference.py) alone, or under ``torchrun --standalone`` with ``procs`` gloo processes."""
    head = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                f"--nproc_per_node={procs}"]
    cmd = [*head, str(script), *map(str, argv), "--device", "cpu", "--no_progress", "--workers", "1"]
    try:
        return subprocess.run(cmd, cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:  # keep what it printed: a hang is otherwise undiagnosable
        out = b"".join(x for x in (e.stdout, e.stderr) if isinstance(x, bytes)).decode(errors="replace")
        pytest.fail(f"still running after {TIMEOUT_S} s: {cmd}\n{out[-6000:]}")


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def images(small_data, tmp_path_factory) -> Path:
    """30 images in nested folders (batches of 4: the last one short) and one unreadable file."""
    root = tmp_path_factory.mktemp("predict") / "images"
    shutil.copytree(small_data, root)
    (root / "val" / "class_1" / "broken.png").write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def checkpoint(trained_run) -> Path:
    return trained_run / "released.pth.tar"


PREDICT = ("--batch_size", "4", "--topk", "2")


@pytest.fixture(scope="module")
def reference(images, checkpoint, tmp_path_factory) -> bytes:
    """The predictions of one uninterrupted process."""
    out = tmp_path_factory.mktemp("reference") / "preds.csv"
    ok(launch("--checkpoint_path", checkpoint, "--predict", images, *PREDICT, "--output", out))
    return out.read_bytes()


def test_eval_mode_2_on_two_processes_equals_one(small_data, checkpoint, tmp_path):
    args = ("--data_url", small_data, "--checkpoint_path", checkpoint, "--eval_mode", "2", "--calib_size", "16",
            "--batch_size", "2", "--early_exit", "--budget_index", "20")
    one = ok(launch(*args, "--save_checkpoint", tmp_path / "one.pth.tar"))
    two = ok(launch(*args, "--save_checkpoint", tmp_path / "two.pth.tar", procs=2))
    assert printed_results(two.stdout) == printed_results(one.stdout)
    # real early exit, one queued stream per process: the same answers as one process (speeds aside)
    early = [[line.split(", ") for line in run.stdout.splitlines() if line.startswith("early_exit ")]
             for run in (one, two)]
    assert len(early[0]) == 1 and early[0][0][-1] == "6/6 exits and 6/6 predictions as simulated"
    assert [p for p in early[1][0] if "images/s" not in p] == [p for p in early[0][0] if "images/s" not in p]
    a, b = (load_checkpoint_file(tmp_path / f"{n}.pth.tar") for n in ("one", "two"))
    assert torch.equal(torch.as_tensor(a["dynamic_threshold"]), torch.as_tensor(b["dynamic_threshold"]))
    assert a["budgeted_batch_classification"] == b["budgeted_batch_classification"]
    # the first process alone prints: every note once
    assert two.stderr.count("evaluating 6 validation images on 2 processes on cpu (gloo)") == 1, two.stderr


def test_predict_on_two_processes_equals_one(images, checkpoint, reference, tmp_path):
    out = tmp_path / "preds.csv"
    two = ok(launch("--checkpoint_path", checkpoint, "--predict", images, *PREDICT, "--output", out, procs=2))
    assert out.read_bytes() == reference
    assert two.stderr.count("summary : 30 images (1 unreadable)") == 1, two.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.csv"]  # no part file left


def killed(tmp_path: Path, checkpoint: Path, images: Path, after: int, procs: int) -> Path:
    """The predictions file of a run that wrote ``after`` batches and part of a row, then was
    killed with SIGKILL; it is left as ``preds.csv.partial``."""
    out, dying = tmp_path / "preds.csv", tmp_path / "dying.py"
    dying.write_text(DYING.format(repo=str(REPO), after=after))
    proc = launch("--checkpoint_path", checkpoint, "--predict", images, *PREDICT, "--output", out, procs=procs,
                  script=dying)
    assert proc.returncode == (-signal.SIGKILL if procs == 1 else 1), proc.stderr[-3000:]
    assert not out.exists() and (tmp_path / "preds.csv.partial").read_bytes().endswith(b"half of a ro")
    return out


@pytest.mark.slow  # a kill -9 and a resume are launched for real; the cut-file resumes below are fast
def test_run_killed_on_two_processes_resumes_alone_to_the_same_bytes(images, checkpoint, reference, tmp_path):
    out = killed(tmp_path, checkpoint, images, 2, procs=2)
    resumed = ok(launch("--checkpoint_path", checkpoint, "--predict", images, *PREDICT, "--output", out, "--resume"))
    assert out.read_bytes() == reference and not (tmp_path / "preds.csv.partial").exists()
    assert "summary : 30 images (1 unreadable)" in resumed.stderr and "(8 of them kept" in resumed.stderr


@pytest.mark.slow
def test_run_killed_alone_resumes_on_two_processes_to_the_same_bytes(images, checkpoint, reference, tmp_path):
    out = killed(tmp_path, checkpoint, images, 3, procs=1)
    ok(launch("--checkpoint_path", checkpoint, "--predict", images, *PREDICT, "--output", out, "--resume", procs=2))
    assert out.read_bytes() == reference


def test_resume_keeps_whole_batches_and_checks_the_sources(images, checkpoint, tmp_path, capsys):
    """In this process: rows cut anywhere (mid-batch, mid-row) resume to the same file; rows of
    other images are refused."""
    out = tmp_path / "preds.jsonl"
    args = ("--checkpoint_path", checkpoint, "--predict", images, *PREDICT, "--output", out)
    assert run_inference(capsys, *args)[0] == 0
    whole = out.read_bytes()
    lines = whole.splitlines(keepends=True)
    for cut in (0, 1, 5, 30):
        out.write_bytes(b"".join(lines[:cut]) + lines[cut][:7] if cut < len(lines) else whole)
        code, _, err = run_inference(capsys, *args, "--resume")
        assert code == 0 and out.read_bytes() == whole, (cut, err)
    (tmp_path / "preds.jsonl.partial").write_bytes(b"".join(lines[:8]))
    code, _, err = run_inference(capsys, *args[:3], images / "val", *args[4:], "--resume")
    assert code == 1 and "does not continue these images" in error_line(err)


def test_existing_output_is_refused_as_it_was(images, checkpoint, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    args = ("--checkpoint_path", checkpoint, "--predict", images / "val", "--output", out)
    for existing, what in ((out, "a file"), (tmp_path / "preds.csv.partial", "the rows of an interrupted run")):
        existing.write_text("mine\n")
        before = snapshot(tmp_path)
        code, stdout, err = run_inference(capsys, *args)
        assert code == 1 and stdout == "" and snapshot(tmp_path) == before
        assert error_line(err) == (f"error: {existing} exists ({what}): --resume to continue it, "
                                   "--overwrite to start over")
        existing.unlink()
    out.write_text("mine\n")
    assert run_inference(capsys, *args, "--overwrite")[0] == 0
    assert out.read_text().startswith("path,class_index")
    code, _, err = run_inference(capsys, *args, "--overwrite", "--resume")
    assert code == 1 and "give one" in error_line(err)


def test_tar_archives_read_like_folders(small_data, images, checkpoint, tmp_path, capsys):
    """A tar archive as a --predict source gives the folder's rows under ``ARCHIVE:MEMBER``;
    tar shards as the splits of an evaluation give the folders' numbers."""
    archive = tmp_path / "images.tar"
    with tarfile.open(archive, "w") as t:
        for path in sorted((images / "val").rglob("*.png")):
            t.add(path, arcname=str(path.relative_to(images)))
    rows = {}
    for source in (images / "val", archive):
        out = tmp_path / f"{source.name}.csv"
        assert run_inference(capsys, "--checkpoint_path", checkpoint, "--predict", source, "--output", out)[0] == 0
        rows[source.name] = out.read_text().splitlines()
    prefix = f"{images}/"
    folder_rows = [line.replace(prefix, f"{archive}:", 1) for line in rows["val"]]
    assert len(rows["images.tar"]) == len(folder_rows) == 8
    for tar_row, folder_row in zip(rows["images.tar"], folder_rows):
        if "broken.png" in folder_row:  # the error names the file its own way
            assert tar_row.startswith(f"{archive}:val/class_1/broken.png,,") and "cannot read image" in tar_row
        else:
            assert tar_row == folder_row
    shards = tar_copy(small_data, tmp_path / "shards")
    results = []
    for data in (small_data, shards):
        code, out, err = run_inference(capsys, "--data_url", data, "--checkpoint_path", checkpoint, "--calib_size", 8,
                                       "--batch_size", 4)
        assert code == 0, err
        results.append(printed_results(out))
    assert results[0] == results[1]


def test_batches_are_dealt_as_one_process_cuts_them(images, tmp_path, monkeypatch):
    """The first process's listing, sent in several messages: each process gets every
    ``world_size``-th batch from the first one still to do, each batch as one process makes it."""
    monkeypatch.setattr(job, "GROUP", 2)
    batches = list(_chunks(iter_image_paths([str(images)]), 4))
    listing = tmp_path / "rank0.pkl"
    # alone, the messages go nowhere: this is the first process's side of two, from batch 1 on
    assert job.deal_batches([str(images)], 4, DistEnv(rank=0, world_size=2), 1, KeptRows(), str(listing)) == 8
    assert list(job.DealtBatches(None, listing=str(listing))._paths()) == batches[1::2] and len(batches) == 8
    assert [len(index) for index in (BatchShardSampler(30, 4, 2, r).index() for r in (0, 1))] == [16, 14]
    assert torch.cat([BatchShardSampler(30, 4, 2, r).index().view(-1) for r in (0, 1)]).sort().values.tolist() == \
        list(range(30))

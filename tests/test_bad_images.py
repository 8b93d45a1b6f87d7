"""Images that cannot be read: a decompression bomb is named before training (and by
inference.py), a truncated file stops the run with one line by default (loader workers
included) and costs one sample under ``--bad-images skip``, within the accepted fraction."""
from __future__ import annotations

import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

import main as train_main
from fake_data import make_image_folder
from helpers import EXACT, REPO, SUBPROCESS_ENV, error_line, main_args, quick_args, read_summary, run_inference, \
    run_main

pytestmark = pytest.mark.usefixtures("one_thread")


def bomb_png(path: Path, side: int = 40000) -> None:
    """A valid PNG header announcing side x side pixels (far above Pillow's limit) in a few bytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
                     + chunk(b"IEND", b""))


def test_decompression_bomb_is_named_before_training(small_data, tmp_path, capsys, trained_run):
    bad = shutil.copytree(small_data, tmp_path / "data")
    bomb = bad / "val" / "class_1" / "huge.png"
    bomb_png(bomb)
    code, out, err = run_main(capsys, quick_args(bad, tmp_path / "out"))
    line = error_line(err)
    assert code == 1 and str(bomb) in line and "pixels" in line, line
    assert not list((tmp_path / "out").rglob("*.pth.tar"))  # before the first epoch
    code, out, err = run_inference(capsys, "--data_url", bad, "--checkpoint_path", trained_run / "released.pth.tar",
                                   "--eval_mode", "1", "--batch_size", "8")
    line = error_line(err)
    assert code == 1 and str(bomb) in line, line


@pytest.fixture()
def data_with_a_bad_file(tmp_path) -> tuple[Path, Path]:
    root = make_image_folder(tmp_path / "bad_data", num_classes=3, train_per_class=8, val_per_class=4)
    bad = root / "train" / "class_1" / "0003.png"
    bad.write_bytes(bad.read_bytes()[:50])  # truncated
    return root, bad


def test_unreadable_image_stops_by_default(tmp_path, data_with_a_bad_file):
    """With loader workers: one line naming the file, and the process ends (the workers, which
    ignore SIGTERM, are shut down before the interpreter exits)."""
    root, bad = data_with_a_bad_file
    done = subprocess.run([sys.executable, str(REPO / "main.py"),
                           *main_args(root, tmp_path / "out", *EXACT, "--epochs", "1", "--workers", "2")],
                          cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(err) == 1, done.stderr
    assert err[0] == f"error: cannot read image {bad}: image file is truncated", err


def test_unreadable_image_under_skip_policy_costs_one_sample(tmp_path, data_with_a_bad_file, capsys):
    root, bad = data_with_a_bad_file
    out = tmp_path / "out"
    assert train_main.main(main_args(root, out, *EXACT, "--epochs", "2", "--bad-images", "skip",
                                     "--bad-images-max-fraction", "0.05")) == 0
    log = capsys.readouterr().out
    lines = [line for line in log.splitlines() if "skipped an unreadable" in line]
    assert len(lines) == 2 and all(str(bad) in line for line in lines)  # one per epoch
    rows = read_summary(out / "train" / "run" / "summary.csv")
    assert [r["train_bad_images"] for r in rows] == ["1", "1"]
    # more than the accepted fraction: the run stops with one line
    assert train_main.main(main_args(root, tmp_path / "out2", *EXACT, "--epochs", "1", "--bad-images", "skip",
                                     "--bad-images-max-fraction", "0.01")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 of the 24 training images could not be read" in err[0], err

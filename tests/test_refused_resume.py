"""A --resume that main.py must refuse gives one ``error:`` line, status 1 (a checkpoint error,
docs/troubleshooting.md) and leaves the run folder byte-identical: a file it cannot read (missing,
a folder, empty, text) or a readable checkpoint that does not fit the run (a released file,
another model, image size or class count, a best checkpoint behind the folder's last)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fake_data import make_image_folder
from helpers import error_line, quick_args, run_main, snapshot
from utils.checkpoint.files import atomic_save, load_checkpoint_file

pytestmark = pytest.mark.usefixtures("one_thread")


def make_refused_resume(case: str, run: Path, tmp_path: Path, data: Path) -> tuple[list[str], str, Path]:
    """(extra argv, expected message part, dataset) of a --resume main.py must refuse."""
    last = run / "last.pth.tar"
    if case == "released file":
        return ["--resume", str(run / "released.pth.tar")], "released checkpoint", data
    if case == "missing file":
        return ["--resume", str(run / "nope.pth.tar")], "not found", data
    if case == "a folder":
        return ["--resume", str(run)], str(run), data
    if case == "zero bytes":
        (tmp_path / "zero.pth.tar").write_bytes(b"")
        return ["--resume", str(tmp_path / "zero.pth.tar")], "empty (0 bytes)", data
    if case == "text file":
        (tmp_path / "notes.pth.tar").write_text("epoch 3: loss 1.2\n")
        return ["--resume", str(tmp_path / "notes.pth.tar")], "text file", data
    if case == "another model":
        return ["--resume", str(last), "--model", "DVT_Deit_small"], "DVT_tiny checkpoint", data
    if case == "another image size":
        return ["--resume", str(last), "--img-size", "48"], "--img-size 32", data
    if case == "more classes":
        four = make_image_folder(tmp_path / "four", num_classes=4, train_per_class=2, val_per_class=1, size=32)
        return ["--resume", str(last)], "classes", four
    if case == "best behind last":
        best = load_checkpoint_file(last)
        best["num_updates"] -= 1
        atomic_save(best, run / "best.pth.tar")
        return ["--resume", str(run / "best.pth.tar")], "behind", data
    raise ValueError(case)


UNREADABLE = ["missing file", "a folder", "zero bytes", "text file"]
NOT_FITTING = ["released file", "another model", "another image size", "more classes", "best behind last"]


@pytest.mark.parametrize("case", UNREADABLE + NOT_FITTING)
def test_refused_resume_changes_nothing(case, trained_run, small_data, tmp_path, capsys):
    out = tmp_path / "out"
    run = out / "train" / "run"
    shutil.copytree(trained_run, run)
    extra, expected, dataset = make_refused_resume(case, run, tmp_path, small_data)
    before = snapshot(out)
    code, _, err = run_main(capsys, quick_args(dataset, out, *extra, experiment=None))
    line = error_line(err)
    assert code == 1 and expected in line, line
    assert snapshot(out) == before

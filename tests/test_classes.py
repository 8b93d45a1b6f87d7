"""Class safety: train/ and val/ must hold the same classes, checkpoints carry the class names
(and follow the umask), one class is only a warning, and inference.py refuses to score a
dataset whose classes differ from the checkpoint's."""
from __future__ import annotations

import shutil

import pytest

from helpers import error_line, quick_args, run_inference, run_main
from utils.checkpoint.files import load_checkpoint_file

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("change, expected", [
    ("drop", "only in train/: 'class_2'"),
    ("rename", "only in val/: 'renamed'"),
])
def test_train_and_val_classes_must_match(change, expected, small_data, tmp_path, capsys):
    bad = shutil.copytree(small_data, tmp_path / "data")
    if change == "drop":
        shutil.rmtree(bad / "val" / "class_2")
    else:
        (bad / "val" / "class_1").rename(bad / "val" / "renamed")
    code, _, err = run_main(capsys, quick_args(bad, tmp_path / "out"))
    line = error_line(err)
    assert code == 1 and expected in line, line
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_checkpoints_store_class_names_and_follow_the_umask(trained_run):
    for name in ("last.pth.tar", "best.pth.tar", "released.pth.tar"):
        checkpoint = load_checkpoint_file(trained_run / name)
        assert checkpoint["class_names"] == ["class_0", "class_1", "class_2"], name
        assert (trained_run / name).stat().st_mode & 0o777 == 0o640, name  # written under umask 027
    assert not list(trained_run.glob(".*.tmp"))


def test_one_class_gives_a_warning(small_data, tmp_path, capsys):
    one = tmp_path / "one"
    for split in ("train", "val"):
        shutil.copytree(small_data / split / "class_0", one / split / "class_0")
    code, out, err = run_main(capsys, quick_args(one, tmp_path / "out", "--no-release", "--mixup", "0",
                                                 "--cutmix", "0"))
    assert code == 0, err
    assert "only 1 class" in out


@pytest.mark.parametrize("change, allowed", [("more classes", False), ("renamed class", True)])
def test_inference_refuses_other_classes(change, allowed, trained_run, small_data, tmp_path, capsys):
    bad = shutil.copytree(small_data, tmp_path / "data")
    if change == "more classes":
        for split in ("train", "val"):
            shutil.copytree(bad / split / "class_0", bad / split / "class_3")
    else:
        for split in ("train", "val"):
            (bad / split / "class_2").rename(bad / split / "zebra")
    common = ["--data_url", bad, "--checkpoint_path", trained_run / "released.pth.tar", "--eval_mode", "1",
              "--batch_size", "8"]
    code, out, err = run_inference(capsys, *common)
    line = error_line(err)
    expected = "--allow_class_mismatch" if allowed else "more than the model's heads (3)"
    assert code == 1 and "classes" in line and expected in line, line
    assert "flops :" not in out  # refused before evaluating
    code, out, err = run_inference(capsys, *common, "--allow_class_mismatch")
    if allowed:  # the same number of classes: the user may know the labels match
        assert code == 0 and "flops :" in out and "zebra" in err, err
    else:  # labels the heads cannot output: never scored
        assert code == 1 and expected in error_line(err)

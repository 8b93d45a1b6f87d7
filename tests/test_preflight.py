"""Checks before a run writes anything: too little free space, a read-only output, an output
that names a file, and non-finite or repeated config values each give one ``error:`` line and
leave the disk as it was."""
from __future__ import annotations

import shutil

import pytest

from helpers import error_line, mount_tmpfs, quick_args, run_inference, run_main, umount

pytestmark = pytest.mark.usefixtures("one_thread")


def test_too_little_free_space_is_refused_before_the_run(small_data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "small"
    mounted = mount_tmpfs(out, 2 ** 20)
    if not mounted:
        usage = shutil.disk_usage(tmp_path)
        monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=2 ** 20))
    try:
        code, _, err = run_main(capsys, quick_args(small_data, out))
        line = error_line(err)
        assert code == 2 and "MiB free" in line, line
        assert not any(out.iterdir())
    finally:
        if mounted:
            umount(out)


def test_read_only_output_is_refused_before_the_run(small_data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ro"
    mounted = mount_tmpfs(out, 2 ** 20, read_only=True)
    if not mounted:  # root writes through permission bits: refuse the access check instead
        import utils.run.preflight

        monkeypatch.setattr(utils.run.preflight.os, "access", lambda path, mode: False)
    try:
        code, _, err = run_main(capsys, quick_args(small_data, out / "runs"))
        line = error_line(err)
        assert code == 2 and "cannot write in" in line and str(out) in line, line
        if mounted:
            assert "read-only" in line, line
    finally:
        if mounted:
            umount(out)


def test_output_naming_a_file(small_data, tmp_path, capsys, trained_run):
    target = tmp_path / "results.txt"
    target.write_text("keep me\n")
    code, _, err = run_main(capsys, quick_args(small_data, target))
    assert code == 2 and "is a file" in error_line(err)
    assert target.read_text() == "keep me\n"
    code, _, err = run_inference(capsys, "--data_url", small_data, "--checkpoint_path",
                                 trained_run / "released.pth.tar", "--eval_mode", "1", "--output", target)
    assert code == 1 and "is a file" in error_line(err)
    assert "evaluating" not in err  # found before the work


@pytest.mark.parametrize("text, flags, expected", [
    ("lr: .nan\n", [], "--lr nan is not a finite number"),
    ("", ["--weight-decay", "inf"], "--weight-decay inf is not a finite number"),
    ("lr: 1.0e-3\nepochs: 2\nlr: 2.0e-3\n", [], "key 'lr' is set twice (lines 1 and 3)"),
])
def test_bad_config_values(text, flags, expected, small_data, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    code, _, err = run_main(capsys, quick_args(small_data, tmp_path / "out", "--config", str(cfg), *flags))
    line = error_line(err)
    assert code == 2 and expected in line, line
    assert not (tmp_path / "out").exists()

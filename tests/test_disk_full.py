"""A full disk during a checkpoint save: one ``error:`` line, and the last good checkpoint and
summary rows are kept, with no temporary file left behind."""
from __future__ import annotations

import errno
import os
import shutil

import pytest

from helpers import error_line, mount_tmpfs, quick_args, run_main, umount
from utils.checkpoint.files import load_checkpoint_file

pytestmark = pytest.mark.usefixtures("one_thread")


def full_disk_writes(monkeypatch) -> None:
    """Without a small tmpfs: from now on, checkpoint writes fail with ENOSPC."""
    real = os.fdopen

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fdopen(fd, mode="r", *args, **kwargs):
        f = real(fd, mode, *args, **kwargs)
        return FullDisk(f) if "w" in mode else f

    monkeypatch.setattr(os, "fdopen", fdopen)


def test_disk_full_during_a_save_keeps_the_last_good_checkpoint(small_data, tmp_path, capsys, monkeypatch,
                                                                 eval_hooks):
    out = tmp_path / "disk"
    mounted = mount_tmpfs(out, 32 * 2 ** 20)

    def fill_the_disk() -> None:
        if mounted:
            (out / "filler").write_bytes(b"\0" * (shutil.disk_usage(out).free - 2 ** 19))
        else:
            full_disk_writes(monkeypatch)

    eval_hooks[3] = fill_the_disk  # epoch 1's validation: epoch 0 is saved, epoch 1's save will not fit
    try:
        code, _, err = run_main(capsys, quick_args(small_data, out, "--epochs", "2", "--no-release"))
        line = error_line(err)
        assert code == 1 and "No space left on device" in line and "last.pth.tar" in line, line
        run = out / "train" / "run"
        saved = load_checkpoint_file(run / "last.pth.tar")
        assert saved["epoch"] == 1  # epoch 0 done, intact
        rows = (run / "summary.csv").read_text().splitlines()
        assert len(rows) == 2  # header and epoch 0: the row of the failed epoch is not there
        assert not list(run.glob(".*.tmp"))
    finally:
        if mounted:
            umount(out)

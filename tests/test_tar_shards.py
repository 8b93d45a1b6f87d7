"""Tar shards: a dataset stored as tar files trains exactly like the same images in folders."""
from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

import main as train_main
from helpers import EXACT, main_args, read_summary, same_weights, untimed
from utils.checkpoint.files import load_checkpoint_file

pytestmark = pytest.mark.usefixtures("one_thread")


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
    assert train_main.main(main_args(image_data, tmp_path / "a", *extra)) == 0
    assert train_main.main(main_args(shards, tmp_path / "b", *extra)) == 0
    a, b = tmp_path / "a" / "train" / "run", tmp_path / "b" / "train" / "run"
    assert untimed(read_summary(a / "summary.csv")) == untimed(read_summary(b / "summary.csv"))
    assert same_weights(load_checkpoint_file(a / "last.pth.tar"), load_checkpoint_file(b / "last.pth.tar"))

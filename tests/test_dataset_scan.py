"""Dataset scans end: symbolic-link loops, hidden and AppleDouble files are harmless; under
several processes the file list is made by rank 0 and shared, and its errors reach every rank."""
from __future__ import annotations

import contextlib
import faulthandler
import os
import shutil
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch
import torch.distributed as dist

import models
from helpers import error_line, quick_args, run_inference, run_main
from models.dvt import to_original_state_dict
from utils.data.scan import scan_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail (dump the stacks and exit) instead of hanging when the body runs for ever."""
    faulthandler.dump_traceback_later(seconds, exit=True, file=sys.__stderr__)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def test_symlink_loop_hidden_and_appledouble_files_are_harmless(small_data, tmp_path, capsys):
    odd = shutil.copytree(small_data, tmp_path / "data")
    (odd / "train" / "class_0" / "loop").symlink_to("..")  # train/class_0/loop -> train
    (odd / "train" / "class_1" / "deeper").mkdir()
    (odd / "train" / "class_1" / "deeper" / "up").symlink_to("../..")  # -> train/class_1... -> train
    (odd / "val" / "class_2" / "._0000.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (odd / "val" / "class_2" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    with deadline(120):
        code, out, err = run_main(capsys, quick_args(odd, tmp_path / "out", "--no-release"))
    assert code == 0, err
    listed = scan_image_folder(odd / "train", report=None)
    assert len(listed.samples) == 24 and listed.classes == ["class_0", "class_1", "class_2"]
    assert listed.skipped["folders seen before"] == 2


@pytest.mark.parametrize("flat", [True, False], ids=["images without class folders", "empty"])
def test_a_split_without_class_folders_is_named_before_anything_is_written(small_data, tmp_path, capsys, flat):
    """ImageNet's validation archive unpacks into one flat folder of images: one line says so."""
    data = shutil.copytree(small_data, tmp_path / "data")
    images = sorted((data / "val").rglob("*.png"))
    for image in images:
        if flat:
            image.rename(data / "val" / f"{image.parent.name}_{image.name}")
    for folder in [p for p in (data / "val").iterdir() if p.is_dir()]:
        shutil.rmtree(folder)
    code, out, err = run_main(capsys, quick_args(data, tmp_path / "out"))
    line = [x for x in err.splitlines() if x.startswith("error:")]
    assert code != 0 and line == [line[-1]] and f"{data / 'val'} has no class folders" in line[0], err
    assert (f"only {len(images)} files" in line[0] and "move each image into the folder of" in line[0]) == flat
    assert not (tmp_path / "out").exists()


def test_an_unextracted_download_is_named(tmp_path, capsys):
    """ImageNet's two archives, downloaded and not extracted: one line names them."""
    for name in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"):
        (tmp_path / "imagenet").mkdir(exist_ok=True)
        (tmp_path / "imagenet" / name).write_bytes(b"")
    code, out, err = run_main(capsys, quick_args(tmp_path / "imagenet", tmp_path / "out"))
    assert code == 1 and ("has no 'train/' folder (expected train/ and val/ ImageFolders; found: no folders; archives "
                          "ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar: extract them into train/ and val/ "
                          "class folders") in err.strip().splitlines()[-1], err
    assert not (tmp_path / "out").exists()


def test_one_split_given_as_the_dataset_folder_gets_the_command_that_fixes_it(small_data, tmp_path, capsys):
    """ImageNet-V2 unpacks to class folders alone, and a val/ folder is easily passed for its
    parent: the missing-split line says so with the command that makes the expected layout (tried
    here), and lists a few of the many folders it found, not all of them."""
    split = shutil.copytree(small_data / "val", tmp_path / "imagenetv2")
    checkpoint = tmp_path / "c.pth.tar"
    model = models.build_dvt("DVT_tiny", num_classes=3, img_size=32)
    torch.save({"model_state_dict": to_original_state_dict(model.state_dict())}, checkpoint)
    argv = ["--checkpoint_path", checkpoint, "--model", "DVT_tiny", "--img_size", "32", "--eval_mode", "2"]
    code, _, err = run_inference(capsys, "--data_url", split, *argv)
    line = error_line(err)
    assert code == 1 and line.endswith(
        f"has no 'val/' folder (expected train/ and val/ ImageFolders; found: class_0, class_1, class_2; {split} "
        f"holds class folders of images itself, one split: put it (or a link to it) at DIR/val and pass DIR, e.g. "
        f"mkdir -p DIR && ln -s {split} DIR/val)"), line
    fixed = tmp_path / "DIR"
    fixed.mkdir()
    (fixed / "val").symlink_to(split)
    (fixed / "train").symlink_to(small_data / "train")
    assert run_inference(capsys, "--data_url", fixed, *argv, "--calib_size", "8")[0] == 0
    for k in range(20):
        (tmp_path / "many" / f"{k:02d}").mkdir(parents=True)
    line = error_line(run_inference(capsys, "--data_url", tmp_path / "many", *argv)[2])
    assert "found: 00, 01, 02, 03, 04, 05, 06, 07, ... (20 folders))" in line and "holds class folders" not in line


def test_files_left_out_for_their_type_are_counted_in_one_line(small_data, tmp_path):
    """Phone photos (.heic) in a training folder are not read: one line says how many, by type."""
    data = shutil.copytree(small_data / "train", tmp_path / "train")
    for name in ("IMG_1.HEIC", "IMG_2.heic", "notes.txt", "README"):
        (data / "class_1" / name).write_bytes(b"x")
    lines: list[str] = []
    listed = scan_image_folder(data, report=lines.append)
    assert len(listed.samples) == 24 and listed.skipped["other files"] == 4
    assert lines == [f"{data}: left out 4 files of other types (2 .heic, 1 .txt, 1 no suffix); "
                     "images are read from .jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff, .webp"]
    lines.clear()
    scan_image_folder(small_data / "train", report=lines.append)
    assert lines == []


def _list_on_rank_zero(rank: int, port: int, folder: str) -> None:
    """One of two processes: joins a gloo group through the test's store, lists (pretends to)
    on rank 0 only."""
    from utils.errors import DataError
    from utils.run.distributed import cleanup_distributed, on_rank_zero, setup_distributed

    # the store is the test's, as torchrun's agent hosts it: no rank binds a port
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      TORCHELASTIC_USE_AGENT_STORE=str(True))
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
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)  # port 0: the system picks one
    torch.multiprocessing.spawn(_list_on_rank_zero, args=(store.port, str(tmp_path)), nprocs=2)
    assert sorted(p.name for p in tmp_path.glob("listed-by-*")) == ["listed-by-0"]
    assert all((tmp_path / f"got-{r}").read_text() == "class_0/a.png,class_1/b.png" for r in range(2))
    # rank 0's error reaches every rank (none waits for a list that never comes)
    assert all("/nowhere" in (tmp_path / f"error-{r}").read_text() for r in range(2))

"""Class safety: train/ and val/ must hold the same classes, checkpoints carry the class names
(and follow the umask), one class is only a warning, and inference.py refuses to score a
dataset whose classes differ from the checkpoint's."""
from __future__ import annotations

import re
import shutil
import sys
import tarfile

import pytest

from helpers import REPO, error_line, printed_results, quick_args, run_inference, run_main
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


def _numbered_data(root, names) -> None:
    """12 classes, class k with k + 1 validation images (and one training image), in folders
    named by ``names[k]``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for k, name in enumerate(names):
        for split, count in (("train", 1), ("val", k + 1)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_class_folders_numbered_0_to_n_are_labelled_by_their_numbers(tmp_path, capsys):
    """ImageNet-V2 names its class folders 0 to 999, which a folder dataset sorts as text (0, 1,
    10, 100, ...): evaluating a model on them labelled every image of folder 10 as class 2, and so
    on, without a word. Such folders are the model's classes by number. A model whose every exit
    answers class 10 is right on exactly folder 10's images (11 of 78), as with zero-padded
    names, whose text order is their number order; the tar-shard reader labels them the same."""
    import torch

    import models
    from models.dvt import to_original_state_dict
    from utils.data.build import read_split
    from utils.data.classes import label_by_number

    torch.manual_seed(0)
    model = models.build_dvt("DVT_tiny", num_classes=12, img_size=32)
    with torch.no_grad():
        for stage in model.stages:
            stage.head.weight.zero_()
            stage.head.bias.copy_(torch.nn.functional.one_hot(torch.tensor(10), 12) * 5.0)
    weights = tmp_path / "always_10.pth.tar"
    torch.save({"model_state_dict": to_original_state_dict(model.state_dict())}, weights)
    results = {}
    for layout, names in (("numbered", [str(k) for k in range(12)]), ("padded", [f"{k:02d}" for k in range(12)])):
        _numbered_data(tmp_path / layout, names)
        code, out, err = run_inference(capsys, "--data_url", tmp_path / layout, "--checkpoint_path", weights,
                                       "--model", "DVT_tiny", "--eval_mode", "2", "--calib_size", "12",
                                       "--img_size", "32", "--output", tmp_path / f"out_{layout}")
        assert code == 0, err
        results[layout] = printed_results(out)["anytime_classification"]
        assert ("numbered 0 to 11 (ImageNet-V2's layout)" in err) == (layout == "numbered"), err
    assert results["numbered"] == results["padded"] == [100 * 11 / 78] * 3
    sys.path.insert(0, str(REPO / "scripts"))
    import visualize_exits

    for layout in ("numbered", "padded"):  # the exit pictures' accuracies too
        args = visualize_exits.build_parser().parse_args([
            "--data_url", str(tmp_path / layout), "--checkpoint_path", str(weights), "--model", "DVT_tiny",
            "--img_size", "32", "--thresholds", "2", "2", "--out", str(tmp_path / f"{layout}.png")])
        assert visualize_exits.visualize(args)["top1"] == pytest.approx(100 * 11 / 78), layout
        said = "val/ has class folders numbered 0 to 11 (ImageNet-V2's layout)" in capsys.readouterr().out
        assert said == (layout == "numbered"), layout
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "val.tar", "w") as tar:
        tar.add(tmp_path / "numbered" / "val", arcname=".")
    for root in (tmp_path / "numbered", shards):
        val = read_split(str(root), "val", None)
        label_by_number(val)
        assert [int(re.split("[/:]", p)[-2]) for p, _ in val.samples] == val.targets, root
        i = next(i for i, (p, _) in enumerate(val.samples) if re.split("[/:]", p)[-2] == "10")
        assert val.classes == [str(k) for k in range(12)] and val[i][1] == 10, root

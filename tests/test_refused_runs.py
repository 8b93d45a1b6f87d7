"""A main.py run refused for a new user's mistake gives one ``error:`` line and the promised
status (2 for options and configs, 1 for checkpoints: docs/troubleshooting.md) before anything is
written: no run folder, no lock, no log, no config.yaml."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from helpers import error_line, main_args, run_main, snapshot
from models.factory import create_cascade
from utils.checkpoint.files import atomic_save

pytestmark = pytest.mark.usefixtures("one_thread")


def write_weights(path: Path, model: str = "DVT_tiny", num_classes: int = 4, img_size: int = 32) -> Path:
    """A plain state dict of ``model`` with ``num_classes`` heads."""
    atomic_save(create_cascade(model, num_classes=num_classes, img_size=img_size).state_dict(), path)
    return path


def refused(capsys, tmp_path: Path, data: Path, *extra: str) -> tuple[int, str]:
    """(status, error line) of main.py with ``extra``, checking that the run wrote nothing."""
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    code, _, err = run_main(capsys, main_args(data, out, *extra))
    line = error_line(err)
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))
    assert snapshot(tmp_path) == before
    return code, line


@pytest.mark.parametrize("flag", ["--finetune", "--initial-checkpoint"])
def test_missing_start_checkpoint(flag, small_data, tmp_path, capsys):
    code, line = refused(capsys, tmp_path, small_data, flag, str(tmp_path / "nope.pth.tar"))
    assert code == 1 and line == f"error: {flag}: checkpoint not found: {tmp_path / 'nope.pth.tar'}"


def test_initial_checkpoint_with_other_classes(small_data, tmp_path, capsys):
    four = write_weights(tmp_path / "four.pth.tar")  # the data has 3 classes
    code, line = refused(capsys, tmp_path, small_data, "--initial-checkpoint", str(four))
    assert code == 1 and line.startswith("error: --initial-checkpoint: checkpoint does not fit DVT_tiny: "
                                         "mis-shaped keys"), line
    assert "head.weight (checkpoint (4, " in line, line


def test_finetune_from_another_model(small_data, tmp_path, capsys):
    other = write_weights(tmp_path / "deit.pth.tar", "DVT_Deit_small", num_classes=3)
    code, line = refused(capsys, tmp_path, small_data, "--finetune", str(other))
    assert code == 1 and line.startswith("error: --finetune: checkpoint does not fit DVT_tiny: "), line


@pytest.mark.parametrize("where", ["flag", "yaml"])
def test_unknown_scheduler(where, small_data, tmp_path, capsys):
    extra = ["--sched", "cosin"]
    if where == "yaml":
        (tmp_path / "sched.yaml").write_text("sched: cosin\n")
        extra = ["--config", str(tmp_path / "sched.yaml")]  # the last --config wins over the tiny one
    code, line = refused(capsys, tmp_path, small_data, *extra)
    assert code == 2 and line.startswith("error: unknown --sched 'cosin' (did you mean 'cosine'?); timm's "
                                         "schedulers: cosine, "), line


def test_float16_autocast_on_the_cpu(small_data, tmp_path, capsys):
    code, line = refused(capsys, tmp_path, small_data, "--amp-dtype", "float16")
    assert code == 2 and line == ("error: --amp-dtype float16: float16 needs CUDA; on the CPU use bfloat16 "
                                  "(or no autocast)")


@pytest.mark.parametrize("spec, part", [
    ("rand-m9-mstd0.5-inc1x", "in section 'inc1x', inc takes an integer"),
    ("randaugment", "unknown augmentation 'randaugment'"),
    ("rand-m9-foo", "unknown section 'foo'"),
])
def test_bad_auto_augment_flag(spec, part, small_data, tmp_path, capsys):
    code, line = refused(capsys, tmp_path, small_data, "--aa", spec)
    assert code == 2 and line.startswith(f"error: --aa {spec}: {part}"), line


def test_bad_auto_augment_in_yaml(small_data, tmp_path, capsys):
    (tmp_path / "aa.yaml").write_text("aa: rand-m9-foo\n")
    code, line = refused(capsys, tmp_path, small_data, "--config", str(tmp_path / "aa.yaml"))
    assert code == 2 and line.startswith("error: --aa rand-m9-foo: unknown section 'foo'"), line


@pytest.mark.parametrize("typo, key", [("bacth_size", "batch-size"), ("bacth-size", "batch-size"),
                                       ("decay_rat", "decay-rate"), ("model_ema_decy", "model-ema-decay")])
def test_yaml_typo_suggests_the_dashed_key(typo, key, small_data, tmp_path, capsys):
    (tmp_path / "typo.yaml").write_text(f"{typo}: 8\n")
    code, line = refused(capsys, tmp_path, small_data, "--config", str(tmp_path / "typo.yaml"))
    assert code == 2 and line == (f"error: unknown key '{typo}' in config {tmp_path / 'typo.yaml'} "
                                  f"(did you mean '{key}'?)")


def test_finetune_checked_once_then_run(small_data, tmp_path, capsys, caplog, monkeypatch):
    """--finetune replaces the heads, so a 4-class file passes the checks of a 3-class run; the
    run then uses the file those checks read rather than reading it again."""
    import utils.run.preflight as preflight
    import utils.train.model as model_module

    reads = []
    load = preflight.load_checkpoint_file
    monkeypatch.setattr(preflight, "load_checkpoint_file", lambda path: reads.append(path) or load(path))
    monkeypatch.setattr(model_module, "load_checkpoint_file", lambda path: reads.append(path) or load(path))
    four = write_weights(tmp_path / "four.pth.tar")
    code, _, err = run_main(capsys, main_args(small_data, tmp_path / "out", "--finetune", str(four), "--epochs", "1",
                                              "--calib-size", "8", "--log-interval", "0", "--no-release"))
    assert code == 0, err
    assert reads == [str(four)] and "(model weights, 4 -> 3 classes)" in caplog.text


def test_eval_metric_of_a_missing_exit(small_data, tmp_path, capsys):
    code, line = refused(capsys, tmp_path, small_data, "--eval-metric", "exit5_top1")
    assert code == 2, line
    assert line.startswith("error: --eval-metric 'exit5_top1': DVT_tiny has 3 exits; choose one of "), line


@pytest.mark.parametrize("split", ["train", "val"])
def test_class_folder_without_images(split, small_data, tmp_path, capsys):
    """Every image is listed before the run folder exists: an empty class folder leaves nothing behind."""
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    empty = sorted((data / split).iterdir())[1]
    for image in empty.iterdir():
        image.unlink()
    code, line = refused(capsys, tmp_path, data)
    assert code == 1, line
    assert line.startswith(f"error: no images in the class folder(s) {empty.name} of {data / split} "), line

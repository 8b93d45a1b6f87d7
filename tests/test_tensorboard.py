"""main.py --tensorboard: the epoch metrics as TensorBoard scalars, read back with TensorBoard's
own event reader; a resumed run records no step twice; a missing package is one line."""
from __future__ import annotations

import importlib.util

import pytest
from helpers import main_args, read_summary, run_main, snapshot

from utils.run.records import TENSORBOARD_DIR, TensorBoardLog, tensorboard_tag

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Tag -> [(step, value)] of every scalar in the run's TensorBoard folder, as TensorBoard
    shows them (events dropped by a purge are not shown)."""
    acc = EventAccumulator(str(folder / TENSORBOARD_DIR), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tags_follow_the_summary_columns():
    assert tensorboard_tag("train_exit2_loss") == "train/exit2_loss"
    assert tensorboard_tag("eval_exit3_top1") == "val/exit3_top1"
    assert tensorboard_tag("ema_eval_exit1_top1") == "val_ema/exit1_top1"
    assert tensorboard_tag("lr") == "lr"


def test_a_two_epoch_run_has_scalars_for_every_exit(small_data, tmp_path, capsys):
    code, _, err = run_main(capsys, main_args(small_data, tmp_path / "out", "--epochs", "2", "--calib-size", "8",
                                              "--log-interval", "0", "--no-release", "--tensorboard"))
    assert code == 0, err
    folder = tmp_path / "out" / "train" / "run"
    found = scalars(folder)
    for k in (1, 2, 3):
        for tag in (f"train/exit{k}_loss", f"train/exit{k}_top1", f"val/exit{k}_loss", f"val/exit{k}_top1"):
            assert [step for step, _ in found[tag]] == [0, 1], tag
    for tag in ("lr", "train/img_per_s", "train/skipped_steps", "epoch_time_s", "val/dynamic_top1_p10",
                "val/dynamic_gflops_p40"):
        assert [step for step, _ in found[tag]] == [0, 1], tag
    rows = read_summary(folder / "summary.csv")
    for epoch, row in enumerate(rows):
        assert found["val/exit3_top1"][epoch][1] == pytest.approx(float(row["eval_exit3_top1"]))
        assert found["train/exit1_loss"][epoch][1] == pytest.approx(float(row["train_exit1_loss"]))
        # larger budget rows send more images on: the expected cost grows with p
        for p in (5, 10, 20, 40):
            assert 0.0 <= found[f"val/dynamic_top1_p{p}"][epoch][1] <= 100.0
        gflops = [found[f"val/dynamic_gflops_p{p}"][epoch][1] for p in (5, 10, 20, 40)]
        assert gflops == sorted(gflops) and gflops[0] > 0


def test_a_resumed_run_records_no_step_twice(small_data, tmp_path, capsys):
    out = tmp_path / "out"
    base = main_args(small_data, out, "--calib-size", "8", "--log-interval", "0", "--no-release", "--tensorboard")
    code, _, err = run_main(capsys, base + ["--epochs", "1"])
    assert code == 0, err
    folder = out / "train" / "run"
    # what a run killed after writing epoch 1's scalars, before its checkpoint, would leave behind
    stray = TensorBoardLog(folder, 1)
    stray.write({"epoch": 1, "eval_exit3_top1": -1.0, "lr": -1.0})
    stray.close()
    code, _, err = run_main(capsys, base + ["--epochs", "2", "--resume", str(folder / "last.pth.tar")])
    assert code == 0, err
    found = scalars(folder)
    assert [step for step, _ in found["val/exit3_top1"]] == [0, 1]
    assert found["val/exit3_top1"][1][1] != -1.0 and found["lr"][1][1] != -1.0
    rows = read_summary(folder / "summary.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert found["val/exit3_top1"][1][1] == pytest.approx(float(rows[1]["eval_exit3_top1"]))


def test_without_the_package_the_run_is_refused_in_one_line(small_data, tmp_path, capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else find_spec(name, *a))
    tmp_path.joinpath("out").mkdir()
    before = snapshot(tmp_path)
    code, _, err = run_main(capsys, main_args(small_data, tmp_path / "out", "--tensorboard"))
    assert code == 2
    assert err.strip() == ("error: --tensorboard needs the tensorboard package: "
                           "pip install -r requirements-deploy.txt")
    assert snapshot(tmp_path) == before

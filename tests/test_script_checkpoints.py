"""scripts/export_stages.py and scripts/visualize_exits.py take any checkpoint (any number of
classes, this project's files and model folders naming their model and image size), and refuse a
mistake with one ``error:`` line before writing anything: status 2 for an option (an unknown
--model), 1 for a checkpoint (missing, a folder, another model or image size)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from helpers import REPO, error_line, snapshot
from models.dvt import to_original_state_dict
from models.factory import create_cascade
from utils.checkpoint.files import atomic_save
from utils.checkpoint.hub import save_model_folder
from utils.checkpoint.model_folder import CONFIG_FILE, WEIGHTS_FILE

sys.path.insert(0, str(REPO / "scripts"))
import export_stages  # noqa: E402
import visualize_exits  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A 4-class DVT_tiny at 64 px as a released file (names nothing), as a file of ours (names
    its model and size) and as a model folder."""
    root = tmp_path_factory.mktemp("checkpoints")
    model = create_cascade("DVT_tiny", num_classes=4, img_size=64).eval()
    atomic_save({"model_state_dict": to_original_state_dict(model.state_dict())}, root / "tiny.pth.tar")
    ours = {"model_name": "DVT_tiny", "model_kwargs": dict(model.model_kwargs), "model": model.state_dict()}
    atomic_save(ours, root / "ours.pth.tar")
    save_model_folder(model, ours, root / "folder")
    return {"released": root / "tiny.pth.tar", "ours": root / "ours.pth.tar", "folder": root / "folder"}


def export(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = export_stages.main([*argv, "--batch", "2"])
    out, err = capsys.readouterr()
    return code, out, err


def test_export_a_model_folder_naming_nothing_else(files, tmp_path, capsys):
    """No --model, no --img-size: the folder's config says them (4 classes, 64 px)."""
    code, out, err = export(capsys, "--checkpoint", str(files["folder"]), "--out", str(tmp_path / "out"),
                            "--thresholds", "0.5", "0.5", "0")
    assert code == 0, err
    assert "exported 3 stages" in out and "same exits as eager: True" in out, out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["stage0.pt2", "stage1.pt2", "stage2.pt2"]


@pytest.mark.parametrize("which", ["released", "ours"])
def test_model_of_any_checkpoint(which, files):
    """A released file with --model and --img-size (it names neither), a file of ours without."""
    args = export_stages.parse_args(["--checkpoint", str(files[which]), "--out", "unused"] +
                                    (["--model", "DVT_tiny", "--img-size", "64"] if which == "released" else []))
    model = export_stages.build_model(args)
    assert (model.model_name, model.num_classes, model.img_size) == ("DVT_tiny", 4, 64)


def refused(capsys, tmp_path: Path, *argv: str) -> tuple[int, str]:
    """(status, error line) of export_stages.py writing into tmp_path/out, checking it wrote nothing."""
    before = snapshot(tmp_path)
    code, out, err = export(capsys, *argv, "--out", str(tmp_path / "out"))
    assert out == "" and snapshot(tmp_path) == before
    return code, error_line(err)


def test_unknown_model(tmp_path, capsys):
    code, line = refused(capsys, tmp_path, "--model", "DVT_tiniest")
    assert code == 2 and line.startswith("error: unknown model 'DVT_tiniest'; choose one of: DVT_T2t_vit_12, "), line


def test_no_model_and_no_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        export(capsys, "--out", str(tmp_path / "out"))
    assert e.value.code == 2 and "--model is needed without --checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_checkpoint_folder_without_config(files, tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    code, line = refused(capsys, tmp_path, "--checkpoint", str(folder))
    assert code == 1 and line == (f"error: {folder} is a folder, not a checkpoint file or a model folder "
                                  f"({CONFIG_FILE} + {WEIGHTS_FILE}); pass a file in it "
                                  f"(e.g. {folder / 'last.pth.tar'})")


def test_missing_checkpoint(tmp_path, capsys):
    code, line = refused(capsys, tmp_path, "--checkpoint", str(tmp_path / "nope.pth.tar"))
    assert code == 1 and line == f"error: checkpoint not found: {tmp_path / 'nope.pth.tar'}"


def test_checkpoint_of_another_model(files, tmp_path, capsys):
    code, line = refused(capsys, tmp_path, "--checkpoint", str(files["ours"]), "--model", "DVT_Deit_small")
    assert code == 1 and line == (f"error: {files['ours']} holds a DVT_tiny checkpoint, but --model is DVT_Deit_small; "
                                  "drop --model or pass --model DVT_tiny")


def test_checkpoint_of_another_image_size(files, tmp_path, capsys):
    code, line = refused(capsys, tmp_path, "--checkpoint", str(files["folder"]), "--img-size", "224")
    assert code == 1 and line == (f"error: {files['folder']} was trained at --img-size 64, but --img-size is 224; "
                                  "drop --img-size or pass --img-size 64")


def test_released_file_for_another_model(files, tmp_path, capsys):
    code, line = refused(capsys, tmp_path, "--checkpoint", str(files["released"]), "--model", "DVT_Deit_small")
    assert code == 1 and line.startswith("error: checkpoint does not fit DVT_Deit_small: "), line


def test_wrong_number_of_thresholds(files, tmp_path, capsys):
    code, line = refused(capsys, tmp_path, "--checkpoint", str(files["ours"]), "--thresholds", "0.5")
    assert code == 2 and line == "error: --thresholds needs 3 values, got 1"


def test_visualize_names_a_checkpoint_folder(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    before = snapshot(tmp_path)
    code = visualize_exits.main(["--data_url", str(tmp_path), "--checkpoint_path", str(folder), "--budget", "1",
                                 "--out", str(tmp_path / "exits.png")])
    line = error_line(capsys.readouterr().err)
    assert code == 1 and line.startswith(f"error: {folder} is a folder, not a checkpoint file or a model folder"), line
    assert snapshot(tmp_path) == before

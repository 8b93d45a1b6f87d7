"""The exit statuses docs/troubleshooting.md promises, for the mistakes a new user makes with
inference.py: 2 for an option (an unknown --model, as in main.py), 1 for data (nothing to
classify); one ``error:`` line and nothing written either way."""
from __future__ import annotations

import pytest

from helpers import REPO, error_line, run_inference, snapshot
from models.factory import create_cascade
from models.registry import MODEL_CFGS
from utils.checkpoint.files import atomic_save

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("mode", ["evaluate", "predict"])
def test_unknown_model_is_an_option_error(mode, trained_run, small_data, tmp_path, capsys):
    checkpoint = trained_run / "released.pth.tar"
    argv = (["--data_url", small_data, "--eval_mode", "1", "--output", tmp_path / "report"] if mode == "evaluate" else
            ["--predict", small_data / "val", "--output", tmp_path / "preds.csv"])
    before = snapshot(tmp_path)
    code, out, err = run_inference(capsys, "--checkpoint_path", checkpoint, "--model", "DVT_tiniest", *argv)
    assert code == 2 and out == ""
    assert error_line(err) == (f"error: unknown model 'DVT_tiniest' (did you mean DVT_tiny?): neither a DVT model "
                               f"({', '.join(MODEL_CFGS)}) nor a timm model"), err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_list_file_is_refused_like_an_empty_folder(content, trained_run, tmp_path, capsys):
    listed = tmp_path / "images.txt"
    listed.write_text(content)
    before = snapshot(tmp_path)
    code, out, err = run_inference(capsys, "--checkpoint_path", trained_run / "released.pth.tar", "--predict", listed,
                                   "--output", tmp_path / "preds.csv")
    assert code == 1 and out == ""
    assert error_line(err) == f"error: no images in {listed}: the list file names no image (one path per line)"
    assert snapshot(tmp_path) == before
    (tmp_path / "empty").mkdir()
    code, _, err = run_inference(capsys, "--checkpoint_path", trained_run / "released.pth.tar", "--predict",
                                 tmp_path / "empty")
    assert code == 1 and error_line(err).startswith(f"error: no images in {tmp_path / 'empty'} (looked for ")


def test_docs_table_states_the_statuses():
    """docs/troubleshooting.md's table puts each mistake under the status the code gives it."""
    text = (REPO / "docs" / "troubleshooting.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "another model" in rows["1"] and "run folder in use" not in rows["1"]
    assert "run folder in use" in rows["2"] and "unknown `--model`" in rows["2"].split("|")[3]


@pytest.mark.parametrize("mode, missing", [("0", "'flops', 'anytime_classification', 'budgeted_batch_classification'"),
                                           ("1", "'dynamic_threshold'")])
def test_plain_state_dict_where_a_mode_reads_results(mode, missing, small_data, tmp_path, capsys):
    """--eval_mode 0 and 1 read results a plain state dict does not hold: one short line that
    names them and counts the file's tensors instead of listing hundreds of weight names."""
    weights = tmp_path / "weights.pth.tar"
    state = create_cascade("DVT_tiny", num_classes=3, img_size=32).state_dict()
    atomic_save(state, weights)
    before = snapshot(tmp_path)
    code, out, err = run_inference(capsys, "--data_url", small_data, "--model", "DVT_tiny", "--checkpoint_path",
                                   weights, "--eval_mode", mode, "--output", tmp_path / "report")
    line = error_line(err)
    assert code == 1 and out == "" and snapshot(tmp_path) == before
    assert line.startswith(f"error: {weights} has no {missing} entry, needed by --eval_mode {mode}"), line
    first = ", ".join(list(state)[:3])
    assert line.endswith(f"(it holds: {len(state)} tensors ({first}, ...))"), line
    assert len(line) - len(str(weights)) < 240, line  # short whatever the path

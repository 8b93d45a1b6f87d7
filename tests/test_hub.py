"""Hub-style model folders (config.json + model.safetensors): written by
scripts/save_pretrained.py, read by timm's ``local-dir:``, inference.py and DVTClassifier exactly
as the ``.pth.tar`` they came from, without reading any pickle."""
from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import pytest
import timm
import torch

import models
from golden import VARIANTS, golden_state_dict, load_manifest
from helpers import REPO, run_inference
from models.dvt import to_original_state_dict
from utils.checkpoint.files import atomic_save, load_checkpoint_file
from utils.checkpoint.model_folder import CONFIG_FILE, WEIGHTS_FILE
from utils.checkpoint.weights import build_from_checkpoint
from utils.errors import CheckpointError
from utils.predict import DVTClassifier

sys.path.insert(0, str(REPO / "scripts"))
import save_pretrained  # noqa: E402

RELEASED = {name: variant for variant, (name, fr, rr) in VARIANTS.items() if fr and rr}


def seeded_model(name: str) -> torch.nn.Module:
    """The released models with the golden weights (original key layout), the others seeded."""
    model = models.build_dvt(name).eval()
    if name in RELEASED:
        model.load_state_dict(golden_state_dict(load_manifest(RELEASED[name]), "A"))
    else:
        torch.manual_seed(0)
        model = models.build_dvt(name).eval()
    return model


def results_of(num_exits: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "flops": torch.rand(num_exits, generator=g).cumsum(0).tolist(),
        "anytime_classification": (torch.rand(num_exits, generator=g) * 100).tolist(),
        "dynamic_threshold": torch.cat([torch.rand(59, num_exits - 1, generator=g), torch.full((59, 1), -1e8)], 1),
        "budgeted_batch_classification": [torch.rand(59, generator=g).tolist(), torch.rand(59, generator=g).tolist()],
    }


def convert(checkpoint_path: Path, out: Path, *extra: str) -> int:
    return save_pretrained.main(["--checkpoint_path", str(checkpoint_path), "--out", str(out), *extra])


# The large cascades take minutes on two cores: run them with -m slow.
LARGE = ("DVT_T2t_vit_14", "DVT_Deit_small", "DVT_Vit_base_49_196")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in LARGE else n
                                  for n in models.MODEL_CFGS])
def test_every_model_round_trips_through_a_folder(name, tmp_path, capsys):
    """A released-layout file (original keys for three exits, no model name) -> folder: the same
    logits through timm's local-dir, through load_checkpoint_file, and the same stored results."""
    model = seeded_model(name)
    state_dict = model.state_dict()
    results = results_of(model.num_exits)
    released = {"model_state_dict": to_original_state_dict(state_dict) if model.num_exits == 3 else state_dict,
                **results}
    if model.num_exits != 3:
        released["model_name"] = name  # two-exit files are this project's own: they name their model
    atomic_save(released, tmp_path / "released.pth.tar")
    assert convert(tmp_path / "released.pth.tar", tmp_path / "hub") == 0
    assert f"wrote {tmp_path / 'hub'}: {name}, {model.num_exits} exits, 1000 classes" in capsys.readouterr().out

    config = json.loads((tmp_path / "hub" / CONFIG_FILE).read_text())
    assert config["architecture"] == name and config["num_classes"] == 1000
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    from_file, _ = build_from_checkpoint(load_checkpoint_file(tmp_path / "released.pth.tar"), "file")
    from_folder, _ = build_from_checkpoint(load_checkpoint_file(tmp_path / "hub"), "folder")
    from_timm = timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True).eval().requires_grad_(False)
    with torch.no_grad():
        expected = from_file(x)
        for other in (from_folder, from_timm):
            assert all(torch.equal(a, b) for a, b in zip(expected, other(x)))

    stored = load_checkpoint_file(tmp_path / "hub")
    assert torch.equal(stored["dynamic_threshold"], results["dynamic_threshold"].float())
    assert stored["budgeted_batch_classification"] == results["budgeted_batch_classification"]
    assert stored["flops"] == results["flops"]
    assert stored["anytime_classification"] == results["anytime_classification"]


def test_reuse_switches_and_class_names_travel(tmp_path, capsys):
    torch.manual_seed(0)
    model = models.build_dvt("DVT_tiny", num_classes=4, img_size=64, feature_reuse=False).eval()
    names = ["circle", "square", "triangle", "star"]
    atomic_save({"model": model.state_dict(), "model_name": "DVT_tiny", "format": "dvt-train-1",
                 "model_kwargs": dict(model.model_kwargs), "class_names": names, "model_ema": None},
                tmp_path / "last.pth.tar")
    assert convert(tmp_path / "last.pth.tar", tmp_path / "hub") == 0
    assert "4 classes with names, model weights" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "hub").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    config = json.loads((tmp_path / "hub" / CONFIG_FILE).read_text())
    assert config["model_args"] == {"num_classes": 4, "img_size": 64, "feature_reuse": False}
    assert config["label_names"] == names and config["pretrained_cfg"]["input_size"] == [3, 64, 64]
    again = timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True).eval()
    assert again.pretrained_cfg["label_names"] == names
    assert again.model_kwargs == {"num_classes": 4, "img_size": 64, "feature_reuse": False}
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(x), again(x)))
    clf = DVTClassifier.from_checkpoint(tmp_path / "hub")
    assert clf.model.pretrained_cfg["label_names"] == names


@pytest.fixture
def tiny_folder(tmp_path, capsys) -> Path:
    torch.manual_seed(0)
    model = models.build_dvt("DVT_tiny", num_classes=3, img_size=64).eval()
    atomic_save({"model_state_dict": model.state_dict(), "model_name": "DVT_tiny",
                 "model_kwargs": dict(model.model_kwargs), **results_of(3)}, tmp_path / "tiny.pth.tar")
    assert convert(tmp_path / "tiny.pth.tar", tmp_path / "hub") == 0
    capsys.readouterr()
    return tmp_path / "hub"


def test_weights_that_do_not_fit_the_config_are_refused_naming_the_key(tiny_folder, capsys):
    config = json.loads((tiny_folder / CONFIG_FILE).read_text())
    config["model_args"]["relation_reuse"] = False
    (tiny_folder / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not fit .*config\.json \(DVT_tiny\): "
                                              r"unexpected keys \[\d+\]: stages\.1\.relation_reuse_conv"):
        load_checkpoint_file(tiny_folder)
    code, out, err = run_inference(capsys, "--checkpoint_path", tiny_folder, "--eval_mode", "0")
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "relation_reuse_conv" in lines[0]


def test_a_folder_without_weights_or_config_is_one_line(tiny_folder, capsys):
    (tiny_folder / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"has {CONFIG_FILE} but no {WEIGHTS_FILE}"):
        load_checkpoint_file(tiny_folder)
    (tiny_folder / CONFIG_FILE).unlink()
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint file or a model folder"):
        load_checkpoint_file(tiny_folder)
    (tiny_folder / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=f"cannot read {tiny_folder / CONFIG_FILE}"):
        load_checkpoint_file(tiny_folder)


def test_no_pickle_is_read_on_the_folder_path(tiny_folder, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was read")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    code, out, err = run_inference(capsys, "--checkpoint_path", tiny_folder, "--eval_mode", "0")
    assert code == 0, err
    clf = DVTClassifier.from_checkpoint(tiny_folder, budget_index=10)
    assert clf.num_exits == 3
    timm.create_model(f"local-dir:{tiny_folder}", pretrained=True)


def test_inference_reads_a_folder_as_the_file_it_came_from(trained_run, small_data, tmp_path, capsys):
    """Eval modes 0, 1, 2 and --predict print the same lines for released.pth.tar and its folder."""
    assert convert(trained_run / "released.pth.tar", tmp_path / "hub") == 0
    capsys.readouterr()
    for mode in (["--eval_mode", "0"], ["--eval_mode", "1"], ["--eval_mode", "2", "--calib_size", "8"],
                 ["--predict", small_data / "val"]):
        outputs = []
        for source in (trained_run / "released.pth.tar", tmp_path / "hub"):
            code, out, err = run_inference(capsys, "--checkpoint_path", source, "--data_url", small_data,
                                           "--batch_size", "4", *mode)
            assert code == 0, err
            outputs.append(out)
        assert outputs[0] == outputs[1] and outputs[0], mode


def test_the_script_refuses_before_writing(tiny_folder, tmp_path, capsys):
    before = {p.name: p.read_bytes() for p in tiny_folder.iterdir()}
    with pytest.raises(SystemExit) as e:
        convert(tmp_path / "tiny.pth.tar", tiny_folder)
    assert e.value.code == 2 and "exists and is not empty" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tiny_folder.iterdir()} == before
    with pytest.raises(SystemExit) as e:
        convert(tmp_path / "tiny.pth.tar", tmp_path / "new", "--model", "DVT_tiniest")
    assert e.value.code == 2 and not (tmp_path / "new").exists()
    assert "--model DVT_tiniest: unknown model" in capsys.readouterr().err
    assert convert(tmp_path / "missing.pth.tar", tmp_path / "new") == 1
    assert capsys.readouterr().err.strip() == f"error: checkpoint not found: {tmp_path / 'missing.pth.tar'}"
    assert not (tmp_path / "new").exists()
    assert convert(tmp_path / "tiny.pth.tar", tiny_folder, "--overwrite") == 0
    assert sorted(p.name for p in tiny_folder.parent.iterdir() if p.name.startswith(".")) == []


def test_the_release_step_writes_the_folder_beside_the_file(trained_run):
    released = load_checkpoint_file(trained_run / "released.pth.tar")
    folder = load_checkpoint_file(trained_run / "released")
    from_file, _ = build_from_checkpoint(released, "file")
    from_folder, _ = build_from_checkpoint(folder, "folder")
    assert from_folder.model_name == from_file.model_name == "DVT_tiny"
    file_weights, folder_weights = from_file.state_dict(), from_folder.state_dict()
    assert all(torch.equal(file_weights[k], folder_weights[k]) for k in file_weights)
    assert torch.equal(torch.as_tensor(released["dynamic_threshold"]).float(), folder["dynamic_threshold"])
    assert folder["class_names"] == released["class_names"]
    for key in ("flops", "anytime_classification"):
        assert folder[key] == [float(v) for v in released[key]]
    assert folder["budgeted_batch_classification"] == [[float(v) for v in row]
                                                       for row in released["budgeted_batch_classification"]]

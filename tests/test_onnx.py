"""ONNX export of the stages (scripts/export_onnx.py, models/deploy_onnx.py) and real early exit
in ONNX Runtime (utils/predict/onnx_runtime.py): the same class, exit and confidence as
PyTorch's ``forward_early_exit`` for every image, the folder's JSON standing in for the
checkpoint, and one-line errors for missing dependencies and broken folders.

Skipped without onnxruntime, onnx and onnxscript (``pip install -r requirements-deploy.txt``).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

from helpers import midway, spread_cascade, spread_thresholds  # noqa: E402
import models  # noqa: E402
from models.deploy_onnx import export_onnx_stages  # noqa: E402
from utils.errors import CheckpointError, ConfigError  # noqa: E402
from utils.predict import DVTClassifier  # noqa: E402
from utils.predict.onnx_runtime import FOLDER_JSON, OnnxCascade, load_steps, resolve_providers  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import export_onnx  # noqa: E402

IMG = 32
CLASSES = ("ant", "bee", "cow")
FLOPS = [0.01, 0.03, 0.07]
INSTALL_LINE = "pip install -r requirements-deploy.txt"

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_same_early_exit(got, want) -> None:
    assert torch.equal(got.exit_index, want.exit_index)
    assert torch.equal(got.logits.argmax(dim=-1), want.logits.argmax(dim=-1))
    torch.testing.assert_close(got.confidence, want.confidence, rtol=0, atol=1e-4)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-4)


def budget_table() -> dict:
    rows = torch.tensor([[0.99, 0.99, -1e8], [0.9, 0.8, -1e8], [0.7, 0.6, -1e8], [0.5, 0.4, -1e8]])
    return {"dynamic_threshold": rows, "budgeted_batch_classification": [[0.06, 0.05, 0.04, 0.03],
                                                                         [70.0, 69.8, 68.0, 60.0]]}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, models.DVT, dict]:
    """DVT_tiny (32 px, one block a stage) saved as a checkpoint with class names, GFLOPs and a
    budget table, exported through the command line: (folder, model, checkpoint)."""
    root = tmp_path_factory.mktemp("onnx")
    model = spread_cascade("DVT_tiny", IMG, len(CLASSES))
    checkpoint = {"model": model.state_dict(), "model_name": "DVT_tiny",
                  "model_kwargs": {"num_classes": len(CLASSES), "img_size": IMG, "depth": 1},
                  "class_names": list(CLASSES), "flops": FLOPS, **budget_table()}
    torch.save(checkpoint, root / "tiny.pth")
    code = export_onnx.main(["--checkpoint_path", str(root / "tiny.pth"), "--out", str(root / "out"),
                             "--threads", "1"])
    assert code == 0
    return root / "out", model, checkpoint


def test_command_line_writes_stages_and_json(exported, capsys):
    folder, _, checkpoint = exported
    assert sorted(p.name for p in folder.iterdir()) == [FOLDER_JSON, "stage0.onnx", "stage1.onnx", "stage2.onnx"]
    info = json.loads((folder / FOLDER_JSON).read_text())
    assert info["model_name"] == "DVT_tiny" and info["num_exits"] == 3 and info["img_size"] == IMG
    assert info["class_names"] == list(CLASSES) and info["flops"] == FLOPS
    assert info["dynamic_threshold"] == checkpoint["dynamic_threshold"].tolist()
    assert info["budgeted_batch_classification"] == checkpoint["budgeted_batch_classification"]
    assert info["pretrained_cfg"]["input_size"] == [3, IMG, IMG]
    import onnx

    names = [([i.name for i in g.graph.input], [o.name for o in g.graph.output])
             for g in (onnx.load(folder / f"stage{k}.onnx") for k in range(3))]
    carry = ["block_tokens", "block_qkv"]  # the tokens entering the stage's last block, their qkv product
    assert names[0] == (["images"], ["logits", "confidence"] + carry)
    assert names[1] == (["images"] + [f"prev_{n}" for n in carry], ["logits", "confidence"] + carry
                        + ["block_reused", "block_bias"])
    assert names[2] == (["images"] + [f"prev_{n}" for n in carry + ["block_reused", "block_bias"]],
                        ["logits", "confidence"])


def test_early_exit_in_onnx_runtime_matches_pytorch(exported):
    """200 images: ONNX Runtime's stages with run_early_exit between them give every image the
    class, exit and confidence of PyTorch's forward_early_exit, whatever the batch size."""
    folder, model, _ = exported
    cascade = OnnxCascade(folder, providers=["cpu"], threads=1)
    x = torch.randn(200, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    thresholds = spread_thresholds(model, x)
    with torch.no_grad():
        want = model.forward_early_exit(x, thresholds)
        all_exits = model(x[:7])
    got = cascade.forward_early_exit(x, thresholds)
    assert set(want.exit_index.tolist()) == {0, 1, 2}
    assert_same_early_exit(got, want)
    for xs in (x[:1], x[5:18]):
        with torch.no_grad():
            assert_same_early_exit(cascade.forward_early_exit(xs, thresholds), model.forward_early_exit(xs, thresholds))
    for g, w in zip(cascade(x[:7]), all_exits):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-4)
    # streamed (float64 images converted on the way in): each batch's answers as PyTorch's on it
    stream = cascade.early_exit_stream(thresholds)
    streamed = [o for xs in x[:40].double().split(8) for o in stream.push(xs)] + stream.close()
    assert len(streamed) == 5
    for out, xs in zip(streamed, x[:40].split(8)):
        with torch.no_grad():
            assert_same_early_exit(out, model.forward_early_exit(xs, thresholds))


def write_images(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rs = np.random.RandomState(0)
    paths = []
    for i in range(count):
        paths.append(folder / f"{i:03d}.png")
        Image.fromarray(rs.randint(0, 256, (30 + i % 7, 40, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def test_classifier_from_onnx_gives_the_checkpoint_rows(exported, tmp_path):
    """DVTClassifier.from_onnx: the checkpoint's preprocessing, threshold choice (default, budget,
    row), class names and GFLOPs, and the same prediction rows as from_checkpoint."""
    folder, model, _ = exported
    ckpt = folder.parent / "tiny.pth"
    for kwargs in ({}, {"budget": 0.045}, {"budget_index": 2}, {"thresholds": [0.5, 0.5]}):
        assert DVTClassifier.from_onnx(folder, **kwargs).choice == DVTClassifier.from_checkpoint(ckpt, **kwargs).choice
    eager = DVTClassifier.from_checkpoint(ckpt)
    paths = write_images(tmp_path / "images", 40)
    images = torch.stack([eager.transform(Image.open(p).convert("RGB")) for p in paths])
    thresholds = spread_thresholds(model, images)[:2].tolist()
    eager = DVTClassifier.from_checkpoint(ckpt, thresholds=thresholds)
    onnx = DVTClassifier.from_onnx(folder, thresholds=thresholds, providers=["cpu"], threads=1)
    assert onnx.data_config == eager.data_config and onnx.flops == FLOPS
    got, want = onnx.predict(paths, topk=2), eager.predict(paths, topk=2)
    assert {r.exit for r in want} == {1, 2, 3}
    for g, w in zip(got, want):
        assert (g.path, g.index, g.name, g.exit, g.gflops, g.topk_index, g.topk_name) == \
               (w.path, w.index, w.name, w.exit, w.gflops, w.topk_index, w.topk_name)
        assert g.confidence == pytest.approx(w.confidence, abs=1e-4)


def test_inference_predict_runs_in_onnx_runtime(exported, tmp_path, capsys):
    """inference.py --predict --runtime onnxruntime --onnx DIR writes the rows of the PyTorch run
    (confidences to 1e-4); the ONNX options refused where they do not apply, in one line."""
    import csv

    from helpers import error_line, run_inference

    folder, _, _ = exported
    ckpt = folder.parent / "tiny.pth"
    paths = write_images(tmp_path / "images", 12)
    rows = {}
    for name, source in (("torch", ["--checkpoint_path", ckpt]),
                         ("onnxruntime", ["--runtime", "onnxruntime", "--onnx", folder])):
        code, _, err = run_inference(capsys, "--predict", tmp_path / "images", "--budget_index", "2", "--output",
                                     tmp_path / f"{name}.csv", *source)
        assert code == 0, err
        with open(tmp_path / f"{name}.csv", newline="") as f:
            rows[name] = list(csv.DictReader(f))
    assert "ONNX Runtime (CPUExecutionProvider)" in err
    assert len(rows["torch"]) == len(paths)
    for g, w in zip(rows["onnxruntime"], rows["torch"]):
        assert (g["path"], g["class_index"], g["exit"]) == (w["path"], w["class_index"], w["exit"])
        assert float(g["confidence"]) == pytest.approx(float(w["confidence"]), abs=1e-4)
    for argv, message in (
            (["--predict", paths[0], "--runtime", "onnxruntime"], "--runtime onnxruntime needs --onnx DIR"),
            (["--predict", paths[0], "--runtime", "onnxruntime", "--onnx", folder, "--checkpoint_path", ckpt],
             "--checkpoint_path does not go with --runtime onnxruntime"),
            (["--predict", paths[0], "--onnx", folder, "--checkpoint_path", ckpt], "--onnx DIR is read with"),
            (["--onnx", folder, "--checkpoint_path", ckpt, "--eval_mode", "0"], "are for --predict")):
        code, out, err = run_inference(capsys, *argv)
        assert code == 1 and message in error_line(err), err
    code, _, err = run_inference(capsys, "--predict", paths[0])
    assert code == 2 and "the following arguments are required: --checkpoint_path" in err


def test_t2t_stages_export_and_early_exit_matches(tmp_path):
    """A T2T cascade (soft splits, Performer, both reuse paths) at 64 px: the same exits, classes
    and confidences on 200 images. Two exits (7x7, then 14x14 tokens), as each exported stage costs
    seconds: a middle stage, which takes tensors in and passes others on, is tested on DVT_tiny."""
    model = spread_cascade("DVT_T2t_vit_12", 64, 5, head_scale=3.0,  # its confidences on noise are close
                           t2t_geometries=((14, 8, 3), (7, 4, 2)))
    x = torch.randn(200, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    paths = export_onnx_stages(model, x[:2], tmp_path)
    steps = load_steps(paths, providers=["cpu"], threads=1)
    with torch.no_grad():
        thresholds = torch.tensor([midway(model(x)[0].softmax(dim=-1).amax(dim=-1)), -1e8])
        want = model.forward_early_exit(x, thresholds)
        assert_same_early_exit(models.dvt.run_early_exit(steps, x, thresholds), want)
    assert len(paths) == 2 and set(want.exit_index.tolist()) == {0, 1}


def broken_folder(exported: Path, tmp_path: Path, case: str) -> Path:
    folder = tmp_path / "copy"
    shutil.copytree(exported, folder)
    info_path = folder / FOLDER_JSON
    info = json.loads(info_path.read_text())
    if case == "missing folder":
        return tmp_path / "nowhere"
    if case == "no json":
        info_path.unlink()
    elif case == "missing stage":
        (folder / "stage1.onnx").unlink()
    elif case == "extra stage":
        shutil.copy(folder / "stage2.onnx", folder / "stage3.onnx")
    elif case == "fewer exits in the json":
        info["num_exits"], info["flops"] = 2, FLOPS[:2]
    elif case == "image size in the json":
        info["img_size"] = 64
    elif case == "damaged stage":
        (folder / "stage0.onnx").write_bytes(b"not a model")
    if info_path.exists():
        info_path.write_text(json.dumps(info))
    return folder


ERRORS = {
    "missing folder": "no such folder",
    "no json": f"has no {FOLDER_JSON}",
    "missing stage": f"stage1.onnx is missing ({FOLDER_JSON} lists 3 stages)",
    "extra stage": f"holds stage3.onnx, but {FOLDER_JSON} lists 3 stages",
    "fewer exits in the json": f"holds stage2.onnx, but {FOLDER_JSON} lists 2 stages",
    "image size in the json": f"takes images of shape [3, {IMG}, {IMG}], but {FOLDER_JSON} says [3, 64, 64]",
    "damaged stage": "stage0.onnx: onnxruntime cannot load it",
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_broken_folder_gives_one_line(case, exported, tmp_path):
    folder = broken_folder(exported[0], tmp_path, case)
    with pytest.raises(CheckpointError) as info:
        DVTClassifier.from_onnx(folder)
    assert ERRORS[case] in str(info.value) and "\n" not in str(info.value)


def test_other_image_size_or_provider_is_refused(exported):
    folder = exported[0]
    with pytest.raises(ConfigError, match=f"exported for {IMG} px images, not 64: export again with --img-size 64"):
        DVTClassifier.from_onnx(folder, img_size=64)
    with pytest.raises(ConfigError, match="TensorrtExecutionProvider is not available"):
        resolve_providers(["tensorrt"], ["CPUExecutionProvider"])
    assert resolve_providers(["cuda"], ["CUDAExecutionProvider", "CPUExecutionProvider"]) == \
           ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers(None, ["AzureExecutionProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match=f"exported for {IMG} px"):
        OnnxCascade(folder, providers=["cpu"]).forward_early_exit(torch.zeros(1, 3, 40, 40), [0.5, 0.5, -1e8])
    with pytest.raises(ValueError, match=f"exported for {IMG} px"):
        OnnxCascade(folder, providers=["cpu"]).early_exit_stream([0.5, 0.5, -1e8]).push(torch.zeros(1, 3, 40, 40))


def test_missing_packages_give_one_line_naming_the_requirements_file(exported, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(ConfigError, match=f"needs onnxruntime: {INSTALL_LINE}"):
        DVTClassifier.from_onnx(exported[0])
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    assert export_onnx.main(["--checkpoint_path", str(exported[0].parent / "tiny.pth"), "--out",
                             str(tmp_path / "out")]) == 1
    out, err = capsys.readouterr()
    assert err == f"error: ONNX export needs onnx and onnxscript: {INSTALL_LINE}\n" and out == ""
    assert not (tmp_path / "out").exists()


def test_export_beyond_the_tolerance_is_refused_without_json(exported, tmp_path, monkeypatch, capsys):
    """Stages that differ from eager PyTorch: status 1, one line, and no JSON, so the folder
    does not load (the export itself is replaced by a copy of the fixture's stages)."""
    folder = exported[0]

    def copy_stages(model, example, out, opset):
        return [Path(shutil.copy(folder / f"stage{k}.onnx", out)) for k in range(3)]

    monkeypatch.setattr(export_onnx, "export_onnx_stages", copy_stages)
    monkeypatch.setattr(export_onnx, "compare_stages", lambda model, steps, x: [(0.0, 0.0), (3e-3, 1e-5), (0.0, 0.0)])
    shutil.copy(folder / FOLDER_JSON, tmp_path)  # an earlier export's JSON must not survive
    assert export_onnx.main(["--checkpoint_path", str(folder.parent / "tiny.pth"), "--out", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert err == (f"error: the ONNX stages differ from PyTorch by 3.00e-03, above --tolerance 0.0001; {tmp_path} "
                   f"is left without {FOLDER_JSON}\n")
    assert "stage1.onnx vs eager on 8 random images: max |logits diff| 3.00e-03" in out
    assert not (tmp_path / FOLDER_JSON).exists()


def test_export_of_a_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert export_onnx.main(["--checkpoint_path", str(tmp_path / "none.pth"), "--out", str(tmp_path / "out")]) == 1
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and err.count("\n") == 1 and "none.pth" in err, err


def test_benchmark_runs_on_an_exported_folder(exported, capsys):
    import bench_onnx

    folder = exported[0]
    assert bench_onnx.main(["--checkpoint_path", str(folder.parent / "tiny.pth"), "--onnx", str(folder), "--reuse",
                            "--batch-sizes", "1", "4", "--images", "8", "--iters", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "| early exit | 4 |" in out and "| all exits | 1 |" in out
    assert "same exits in ONNX Runtime for 8/8 images" in out and "get_cpu_capability() = " in out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["DVT_T2t_vit_12", "DVT_Deit_small", "DVT_tiny"])
def test_full_size_backbones_export_and_match(name, tmp_path):
    """Every backbone at 224 px with its full depth (random weights): each stage within 1e-4 of
    eager on the logits and confidences, and the same exits on 16 images."""
    torch.manual_seed(0)
    model = models.build_dvt(name, num_classes=10).eval()
    x = torch.randn(16, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    steps = load_steps(export_onnx_stages(model, x[:2], tmp_path), providers=["cpu"])
    for d_logits, d_conf in export_onnx.compare_stages(model, steps, x[:4]):
        assert d_logits < 1e-4 and d_conf < 1e-4
    thresholds = spread_thresholds(model, x)
    with torch.no_grad():
        assert torch.equal(models.dvt.run_early_exit(steps, x, thresholds).exit_index,
                           model.forward_early_exit(x, thresholds).exit_index)

"""inference.py: the original evaluation modes on a tiny ImageFolder, real early exit against
the simulated one, the extra outputs, and clear errors for bad input."""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

import inference
import models
from golden import golden_state_dict, load_manifest
from helpers import REPO, SUBPROCESS_ENV, printed_results
from models.dvt import to_original_state_dict
from utils.budget.plots import BudgetCurve, OperatingPoint, plot_budget_curves
from utils.budget.thresholds import budget_exit_shares, exit_assignment, find_thresholds

IMAGE_SIZES = ((40, 30), (64, 64), (50, 80))  # (width, height); the transforms resize them
BATCH = 4


# ------------------------------------------------------------------ original semantics
# Per-sample loops reading the original inference script step by step, on the full softmax.

def original_find_threshold(probs: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    n_stage, n_sample, _ = probs.size()
    max_preds, _ = probs.max(dim=2)
    _, sorted_idx = max_preds.sort(dim=1, descending=True)
    filtered = torch.zeros(n_sample)
    T = torch.full((n_stage,), 1e8)
    for k in range(n_stage - 1):
        count = 0
        out_n = math.floor(n_sample * p[k])
        for i in range(n_sample):
            ori_idx = sorted_idx[k][i]
            if filtered[ori_idx] == 0:
                count += 1
                if count == out_n:
                    T[k] = max_preds[k][ori_idx]
                    break
        filtered.add_(max_preds[k].ge(T[k]).type_as(filtered))
    T[n_stage - 1] = -1e8
    return T


def original_evaluate(probs: torch.Tensor, targets: torch.Tensor, flops, T) -> tuple[float, float]:
    n_stage, n_sample, _ = probs.size()
    max_preds, argmax_preds = probs.max(dim=2)
    exp = torch.zeros(n_stage)
    acc, expected_flops = 0, 0
    for i in range(n_sample):
        for k in range(n_stage):
            if max_preds[k][i].item() >= T[k]:
                if int(targets[i]) == int(argmax_preds[k][i]):
                    acc += 1
                exp[k] += 1
                break
    for k in range(n_stage):
        expected_flops += 1.0 * exp[k] / n_sample * flops[k]
    return acc * 100.0 / n_sample, expected_flops.item()


def original_anytime(probs: torch.Tensor, targets: torch.Tensor) -> list[float]:
    return [(probs[k].argmax(dim=1) == targets).sum().item() * 100.0 / len(targets) for k in range(len(probs))]


# ----------------------------------------------------------------------------- fixtures

pytestmark = pytest.mark.usefixtures("one_thread")


def write_image_folder(root: Path, seed: int) -> Path:
    rs = np.random.RandomState(seed)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i, (w, h) in enumerate(IMAGE_SIZES):
                Image.fromarray(rs.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("imagenet"), seed=0)


def original_probs(model: torch.nn.Module, folder: Path, transform) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax of every exit (E, N, C) and targets, in ImageFolder order and loader batches."""
    dataset = datasets.ImageFolder(str(folder), transform)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    targets = torch.tensor(dataset.targets)
    with torch.no_grad():
        batches = [torch.stack(model(images[i:i + BATCH])) for i in range(0, len(images), BATCH)]
    return torch.cat(batches, dim=1).softmax(dim=-1), targets


def original_val_transform(size: int = 224) -> transforms.Compose:
    return transforms.Compose([
        transforms.Resize(256 * size // 224, interpolation=InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])


def tiny_model(num_classes: int = 2, seed: int = 0, head_scale: float = 30.0, **kwargs) -> models.DVT:
    """A random DVT_tiny whose heads are scaled up, so confidences spread out."""
    torch.manual_seed(seed)
    model = models.build_dvt("DVT_tiny", num_classes=num_classes, **kwargs)
    with torch.no_grad():
        for stage in model.stages:
            stage.head.weight.mul_(head_scale)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_released(tmp_path_factory) -> Path:
    """DVT_tiny with two classes, released layout, weights only."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth.tar"
    torch.save({"model_state_dict": to_original_state_dict(tiny_model().state_dict())}, path)
    return path


@pytest.fixture(scope="module")
def golden_val(data_root):
    """Golden DVT_T2t_vit_12 and its softmax on the val images, computed here."""
    model = timm.create_model("DVT_T2t_vit_12")
    state_dict = golden_state_dict(load_manifest("DVT_T2t_vit_12"), "A")
    model.load_state_dict(state_dict)
    probs, targets = original_probs(model.eval(), data_root / "val", original_val_transform())
    return state_dict, probs, targets


def gap_thresholds(confidence: torch.Tensor) -> list[float]:
    """Candidate thresholds away from every confidence: below all, between neighbours, none."""
    values = sorted(set(confidence.tolist()))
    mids = [(a + b) / 2 for a, b in zip(values, values[1:])]
    return [values[0] - 0.01] + mids + [1e8]


@pytest.fixture(scope="module")
def golden_released(golden_val, tmp_path_factory):
    """A released-format T2T-12 checkpoint with stored results and 59 x 3 thresholds that send
    the val images to varied exits."""
    state_dict, probs, _ = golden_val
    conf = probs.max(dim=-1).values  # (3, N)
    assert min(abs(a - b) for a in conf.flatten().tolist() for b in conf.flatten().tolist() if a != b) > 1e-5
    c0, c1 = gap_thresholds(conf[0]), gap_thresholds(conf[1])
    rows = [[c0[p % len(c0)], c1[(p // 2) % len(c1)], -1e8] for p in range(59)]
    checkpoint = {
        "model_state_dict": state_dict,
        "flops": [0.47, 1.46, 3.5],
        "anytime_classification": [69.1, 75.7, 80.02],
        "dynamic_threshold": torch.tensor(rows, dtype=torch.float32),
        "budgeted_batch_classification": [[0.5 + 0.05 * p for p in range(59)], [70.0 + 0.17 * p for p in range(59)]],
    }
    path = tmp_path_factory.mktemp("ckpt") / "t2t12.pth.tar"
    torch.save(checkpoint, path)
    return path, checkpoint


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = inference.main([str(a) for a in argv] + ["--no_progress"])
    out, err = capsys.readouterr()
    return code, out, err


def common(data_root: Path, ckpt: Path, mode: int, *extra) -> list:
    return ["--data_url", f"{data_root}/", "--checkpoint_path", ckpt, "--eval_mode", mode,
            "--batch_size", BATCH, "--workers", 0, "--device", "cpu", *extra]


# --------------------------------------------------------------------------- mode 0

def test_mode0_prints_what_is_stored(golden_released, capsys, tmp_path):
    path, checkpoint = golden_released
    code, out, err = run_cli(capsys, "--checkpoint_path", path, "--eval_mode", 0, "--data_url", tmp_path / "none",
                             "--output", tmp_path / "out")
    assert code == 0, err
    assert out.splitlines() == [
        f"flops : {checkpoint['flops']}",
        f"anytime_classification : {checkpoint['anytime_classification']}",
        f"budgeted_batch_classification : {checkpoint['budgeted_batch_classification']}",
    ]
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert report["flops"] == checkpoint["flops"]
    assert (tmp_path / "out" / "accuracy_vs_gflops.png").stat().st_size > 0


def test_mode0_prints_plain_numbers_from_tensors_and_numpy(capsys, tmp_path):
    flops = [torch.tensor(0.47), np.float32(1.46), 3.5]
    anytime = np.array([69.1, 75.7, 80.0])
    curve = torch.tensor([[0.5, 1.0], [70.0, 75.0]], dtype=torch.float64)
    torch.save({"model_state_dict": {}, "flops": flops, "anytime_classification": anytime,
                "budgeted_batch_classification": curve}, tmp_path / "c.pth")
    code, out, err = run_cli(capsys, "--checkpoint_path", tmp_path / "c.pth", "--eval_mode", 0)
    assert code == 0, err
    assert "tensor" not in out and "float" not in out and "array" not in out
    found = printed_results(out)
    assert found["flops"] == [float(f) for f in flops]
    assert found["anytime_classification"] == anytime.tolist()
    assert found["budgeted_batch_classification"] == curve.tolist()


# --------------------------------------------------------------------------- mode 1

def test_mode1_matches_original_algorithm(golden_val, golden_released, data_root, capsys, tmp_path):
    _, probs, targets = golden_val
    path, checkpoint = golden_released
    code, out, err = run_cli(capsys, *common(data_root, path, 1, "--output", tmp_path / "out",
                                            "--allow_class_mismatch"))  # 1000 heads, 2 of the classes
    assert code == 0, err
    found = printed_results(out)
    flops = checkpoint["flops"]
    assert found["flops"] == flops
    assert found["anytime_classification"] == pytest.approx(original_anytime(probs, targets), abs=1e-9)
    expected = [original_evaluate(probs, targets, flops, row) for row in checkpoint["dynamic_threshold"]]
    gflops, top1 = found["budgeted_batch_classification"]
    assert top1 == [acc for acc, _ in expected]
    assert gflops == [cost for _, cost in expected]
    assert len(set(gflops)) > 3  # the stored thresholds send images to varied exits
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert report["flops_source"] == "checkpoint" and report["num_validation"] == 6
    assert report["dynamic_threshold"] == checkpoint["dynamic_threshold"].tolist()
    assert report["budgeted_batch_classification"] == [gflops, top1]
    assert (tmp_path / "out" / "accuracy_vs_gflops.png").stat().st_size > 0


# --------------------------------------------------------------------------- mode 2

def test_mode2_matches_original_search_and_saves(tiny_released, data_root, capsys, tmp_path):
    saved = tmp_path / "with_results.pth.tar"
    code, out, err = run_cli(capsys, *common(data_root, tiny_released, 2, "--model", "DVT_tiny", "--calib_size", 100,
                                             "--calib_transform", "eval", "--output", tmp_path / "out",
                                             "--save_checkpoint", saved))
    assert code == 0, err
    assert "counted with utils.budget.flops.exit_gflops" in err  # weights-only file: flops are counted
    found = printed_results(out)
    gflops, top1 = found["budgeted_batch_classification"]
    assert len(gflops) == len(top1) == 59

    model = tiny_model()
    calib, _ = original_probs(model, data_root / "train", original_val_transform())
    val, targets = original_probs(model, data_root / "val", original_val_transform())
    flops = found["flops"]
    thresholds = [original_find_threshold(calib, budget_exit_shares(p, 3)) for p in range(1, 60)]
    expected = [original_evaluate(val, targets, flops, t) for t in thresholds]
    assert top1 == [acc for acc, _ in expected]
    assert gflops == [cost for _, cost in expected]
    assert found["anytime_classification"] == original_anytime(val, targets)
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    np.testing.assert_allclose(report["dynamic_threshold"], torch.stack(thresholds).numpy(), rtol=1e-5)
    assert report["settings"]["calib_size"] == 100 and report["num_calibration"] == 6
    assert report["num_classes"] == 2  # taken from the checkpoint's heads

    # the saved file serves modes 0 and 1 without --model
    code, out0, err = run_cli(capsys, "--checkpoint_path", saved, "--eval_mode", 0)
    assert code == 0, err
    assert out0 == out
    code, out1, err = run_cli(capsys, *common(data_root, saved, 1))
    assert code == 0, err
    assert out1 == out


def test_mode2_seeded_training_augmentation_is_reproducible(tiny_released, data_root, capsys, tmp_path):
    reports = []
    for run in ("a", "b", "c"):
        seed = 7 if run != "c" else 8
        code, _, err = run_cli(capsys, *common(data_root, tiny_released, 2, "--model", "DVT_tiny", "--calib_size", 4,
                                               "--seed", seed, "--output", tmp_path / run))
        assert code == 0, err
        reports.append(json.loads((tmp_path / run / "results.json").read_text()))
    assert reports[0]["num_calibration"] == 4
    assert reports[0]["dynamic_threshold"] == reports[1]["dynamic_threshold"]
    assert reports[0]["dynamic_threshold"] != reports[2]["dynamic_threshold"]


def test_budget_gives_thresholds_within_the_cost(tiny_released, data_root, capsys, tmp_path):
    code, out, err = run_cli(capsys, *common(data_root, tiny_released, 2, "--model", "DVT_tiny", "--calib_size", 6,
                                             "--calib_transform", "eval", "--budget", 0.05, 0.0892,
                                             "--output", tmp_path))
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.startswith("budget ")]
    assert len(lines) == 2 and lines[0].startswith("budget 0.05 GFLOPs : top-1 ")
    results = json.loads((tmp_path / "results.json").read_text())["budget_results"]
    assert [r["target_gflops"] for r in results] == [0.05, 0.0892]
    for r in results:
        assert r["calib_gflops"] <= r["target_gflops"]
        assert len(r["thresholds"]) == 3 and r["thresholds"][-1] == -1e8
        assert sum(r["val_exit_shares"]) == pytest.approx(1.0)
    # train and val hold the same images here, with the same transform
    assert results[0]["val_gflops"] == pytest.approx(results[0]["calib_gflops"], rel=1e-6)


def test_bf16_autocast_on_cpu(tiny_released, data_root, capsys, tmp_path):
    code, out, err = run_cli(capsys, *common(data_root, tiny_released, 2, "--model", "DVT_tiny", "--calib_size", 6,
                                             "--amp", "bf16", "--output", tmp_path))
    assert code == 0, err
    assert len(printed_results(out)["budgeted_batch_classification"][0]) == 59
    assert json.loads((tmp_path / "results.json").read_text())["amp_dtype"] == "torch.bfloat16"


# ----------------------------------------------------------------------- early exit

EARLY_EXIT_CASES = {
    "3 exits": dict(),
    "2 exits": dict(grids=(7, 14)),
    "3 exits, no feature reuse": dict(feature_reuse=False),
    "2 exits, no relation reuse": dict(grids=(7, 14), relation_reuse=False),
    "3 exits, no reuse": dict(feature_reuse=False, relation_reuse=False),
}


@pytest.mark.parametrize("case", list(EARLY_EXIT_CASES))
def test_early_exit_matches_simulation(case):
    model = tiny_model(num_classes=10, seed=3, head_scale=60.0, **EARLY_EXIT_CASES[case])
    gen = torch.Generator().manual_seed(11)
    calib = torch.randn(24, 3, 224, 224, generator=gen)
    x = torch.randn(16, 3, 224, 224, generator=gen)
    with torch.no_grad():
        calib_conf = torch.stack(model(calib)).softmax(-1).amax(-1)  # (E, 24)
        logits = torch.stack(model(x))  # (E, 16, C)
    conf = logits.softmax(-1).amax(-1)  # (E, 16)
    num_exits = model.num_exits
    shares = torch.stack([budget_exit_shares(p, num_exits) for p in (1, 10, 20, 30, 45, 59)])
    candidates = list(find_thresholds(calib_conf, shares))
    nobody_early = torch.full((num_exits,), 1e8)
    nobody_early[-1] = -1e8
    candidates += [nobody_early, torch.full((num_exits,), -1e8)]  # all at the last / first exit
    seen_exits = set()
    for thresholds in candidates:
        simulated = exit_assignment(conf, thresholds)  # (16,)
        out = model.forward_early_exit(x, thresholds)
        # a confidence within rounding of a threshold may fall either way on a sub-batch
        near = ((conf[:-1] - thresholds[:-1, None]).abs() < 1e-5).any(dim=0)
        assert int(near.sum()) <= 1
        keep = ~near
        assert torch.equal(out.exit_index[keep], simulated[keep]), thresholds
        chosen = logits.gather(0, simulated.view(1, -1, 1).expand(1, -1, logits.shape[-1])).squeeze(0)
        assert torch.equal(out.logits[keep].argmax(-1), chosen[keep].argmax(-1))
        torch.testing.assert_close(out.logits[keep], chosen[keep], rtol=0, atol=1e-4)
        torch.testing.assert_close(out.confidence[keep], conf.gather(0, simulated.view(1, -1)).squeeze(0)[keep],
                                   rtol=0, atol=1e-5)
        seen_exits.update(out.exit_index.tolist())
    assert seen_exits == set(range(num_exits))


@pytest.mark.parametrize("per_batch", [False, True])
def test_early_exit_cli_reports_throughput_and_agreement(per_batch, tiny_released, data_root, capsys, tmp_path):
    """--early_exit (one queued stream over val) and --early_exit_per_batch agree with the simulation."""
    code, out, err = run_cli(capsys, *common(data_root, tiny_released, 2, "--model", "DVT_tiny", "--calib_size", 6,
                                             "--calib_transform", "eval", "--early_exit", "--budget_index", 1, 30,
                                             "--budget", 0.06, "--output", tmp_path,
                                             *(["--early_exit_per_batch"] if per_batch else [])))
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.startswith("early_exit ")]
    assert [line.split(" : ")[0] for line in lines] == [
        "early_exit budget_index 1", "early_exit budget_index 30", "early_exit budget 0.06 GFLOPs"]
    assert all("6/6 exits and 6/6 predictions as simulated" in line for line in lines)
    report = json.loads((tmp_path / "results.json").read_text())
    for r in report["early_exit"]:
        assert r["exits_differing_from_simulation"] == 0 and r["predictions_differing_from_simulation"] == 0
        assert r["top1"] == r["simulated_top1"]
        assert r["images_per_second"] > 0 and r["all_exits_images_per_second"] > 0
        assert sum(r["exit_shares"]) == pytest.approx(1.0)
    assert report["early_exit"][1]["thresholds"] == report["dynamic_threshold"][29]
    assert report["early_exit_queued"] is not per_batch


# ---------------------------------------------------------------------------- errors

@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, tiny_released, data_root) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    full = torch.load(tiny_released, weights_only=True)
    full.update(flops=[0.01, 0.04, 0.09], anytime_classification=[1.0, 2.0, 3.0],
                budgeted_batch_classification=[[0.02], [2.0]], dynamic_threshold=torch.zeros(59, 3))
    paths = {}
    for name, drop in (("no_flops", "flops"), ("no_curve", "budgeted_batch_classification"),
                       ("no_thresholds", "dynamic_threshold")):
        paths[name] = root / f"{name}.pth"
        torch.save({k: v for k, v in full.items() if k != drop}, paths[name])
    paths["bad_shape"] = root / "bad_shape.pth"
    torch.save({**full, "dynamic_threshold": torch.zeros(59, 2)}, paths["bad_shape"])
    paths["project"] = root / "project.pth"
    torch.save({**full, "model_name": "DVT_tiny", "model_kwargs": {"num_classes": 2}}, paths["project"])
    paths["garbage"] = root / "garbage.pth"
    paths["garbage"].write_bytes(b"this is not a checkpoint")
    corrupt = write_image_folder(root / "corrupt", seed=1)
    (corrupt / "val" / "dog" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    paths["corrupt_data"] = corrupt
    (root / "no_val" / "train" / "cat").mkdir(parents=True)
    paths["no_val"] = root / "no_val"
    return paths


def error_cases(bad: dict[str, Path], data: Path, tiny: Path) -> dict[str, tuple[list, str]]:
    return {
        "mode 0 without flops": (["--checkpoint_path", bad["no_flops"], "--eval_mode", 0], "no 'flops' entry"),
        "mode 0 without curve": (["--checkpoint_path", bad["no_curve"], "--eval_mode", 0],
                                 "no 'budgeted_batch_classification' entry"),
        "mode 1 without thresholds": (common(data, bad["no_thresholds"], 1, "--model", "DVT_tiny"),
                                      "no 'dynamic_threshold' entry"),
        "thresholds of another shape": (common(data, bad["bad_shape"], 1, "--model", "DVT_tiny"),
                                        "'dynamic_threshold' must be (budgets, 3)"),
        "--model disagrees with the file": (common(data, bad["project"], 1, "--model", "DVT_T2t_vit_12"),
                                            "holds a DVT_tiny checkpoint, but --model is DVT_T2t_vit_12"),
        "missing dataset": (common(data / "nowhere", tiny, 2, "--model", "DVT_tiny"), "dataset folder not found"),
        "missing val folder": (common(bad["no_val"], tiny, 2, "--model", "DVT_tiny"), "has no 'val/' folder"),
        "corrupt image": (common(bad["corrupt_data"], bad["project"], 1), "cannot read image"),
        "corrupt image in a worker": (common(bad["corrupt_data"], bad["project"], 1, "--workers", 1),
                                      "cannot read image"),
        "corrupt checkpoint": (common(data, bad["garbage"], 1), "cannot read checkpoint"),
        "missing checkpoint": (common(data, bad["garbage"].with_name("absent.pth"), 0), "checkpoint not found"),
        "early exit without thresholds": (common(data, tiny, 2, "--early_exit"), "--early_exit needs thresholds"),
        "per-batch early exit without early exit": (common(data, tiny, 2, "--early_exit_per_batch"),
                                                    "--early_exit_per_batch is used with --early_exit"),
        "budget below the first exit": (common(data, bad["project"], 2, "--budget", 0.001),
                                        "below the cost of the first exit"),
        "budget index out of range": (common(data, bad["project"], 1, "--early_exit", "--budget_index", 60),
                                      "only 59 budgets"),
        "fp16 autocast on the CPU": (common(data, bad["project"], 1, "--amp", "fp16"),
                                     "--amp fp16: float16 needs CUDA"),
    }


ERROR_NAMES = list(error_cases(defaultdict(lambda: Path("x")), Path("d"), Path("t")))  # names; paths from fixtures


@pytest.mark.parametrize("case", ERROR_NAMES)
def test_expected_mistakes_give_one_clear_line(case, bad_inputs, data_root, tiny_released, capsys):
    argv, message = error_cases(bad_inputs, data_root, tiny_released)[case]
    code, out, err = run_cli(capsys, *argv)
    assert code == 1, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], err
    assert "Traceback" not in err and "Original" not in lines[-1]
    assert "flops :" not in out


def test_checkpoint_of_another_model_names_the_likely_model(data_root, tiny_released, capsys):
    code, _, err = run_cli(capsys, *common(data_root, tiny_released, 2, "--model", "DVT_Deit_small"))
    assert code == 1 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("error: checkpoint does not fit DVT_Deit_small") and "checkpoint for DVT_tiny" in err


def test_checkpoint_of_another_image_size_says_so(data_root, tiny_released, capsys):
    code, _, err = run_cli(capsys, *common(data_root, tiny_released, 2, "--model", "DVT_tiny", "--img_size", "48"))
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: checkpoint does not fit DVT_tiny: mis-shaped keys [3]: stages.0.patch_embed.proj")
    hint = "Only the patch embeddings differ: the weights are for another image size; pass the one they have."
    assert err.strip().endswith(hint), err


def test_command_line_error_has_no_traceback(bad_inputs):
    proc = subprocess.run(
        [sys.executable, "inference.py", "--data_url", bad_inputs["corrupt_data"], "--checkpoint_path",
         bad_inputs["project"], "--eval_mode", "1", "--workers", "1", "--batch_size", "2", "--device", "cpu",
         "--no_progress"], cwd=REPO, capture_output=True, text=True, timeout=120,
        env=SUBPROCESS_ENV)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: cannot read image")
    assert "1.png" in proc.stderr


# ------------------------------------------------------------------------------ plots

def test_plot_of_several_curves(tmp_path):
    curves = [BudgetCurve("A", [1.0, 2.0, 1.5], [70.0, 78.0, 75.0], [0.5, 1.5, 3.0], [65.0, 76.0, 80.0]),
              BudgetCurve("B", [1.2, 2.2], [71.0, 77.0])]
    path = plot_budget_curves(curves, tmp_path / "sub" / "plot.png", title="t",
                              points=[OperatingPoint("budget 1.5", 1.5, 75.0)])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="GFLOPs values but"):
        plot_budget_curves([BudgetCurve("C", [1.0], [])], tmp_path / "x.png")


def test_results_json_that_fails_halfway_leaves_the_last_whole_one(tmp_path, monkeypatch):
    """results.json is written into a temporary file of this process and renamed over the old
    one: a write that fails halfway (a full disk) leaves the old file whole and no temporary file."""
    from pathlib import Path

    from utils.budget.report import write_json
    path = tmp_path / "results.json"
    write_json({"top1": 1.0}, path)
    real = Path.write_text

    def full_disk(self, text, *args, **kwargs):
        real(self, text[:5])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_json({"top1": 2.0}, path)
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"top1": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
    write_json({"top1": 2.0}, path)
    assert json.loads(path.read_text()) == {"top1": 2.0} and [p.name for p in tmp_path.iterdir()] == ["results.json"]


# -------------------------------------------------------------------------- benchmark

def load_script(name: str):
    """A fresh module of ``scripts/<name>.py`` (fresh, so a test's monkeypatching stays its own)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_speed_benchmark_runs(capfd):
    """scripts/benchmark.py: every section, with the machine line and a non-DVT baseline built
    for the same image size; nothing of the profiler's own logging on standard error."""
    bench = load_script("benchmark")
    code = bench.main(["--models", "DVT_tiny", "--img-size", "64", "--batch", "4", "--repeats", "1", "--threads", "1",
                       "--dtypes", "fp32", "--baseline", "deit_tiny_patch16_224", "--stages", "--early-exit",
                       "--ee-batches", "1", "8", "--pool", "28", "--latency", "3", "--whole-last-blocks", "--parts",
                       "--products", "2", "300"])
    out, err = capfd.readouterr()
    assert code == 0 and "profiler_st" not in err and "gpuGetDeviceCount" not in err
    assert f"get_cpu_capability() = {torch.backends.cpu.get_cpu_capability()}" in out
    for heading in ("### All exits", "stages and reuse paths", "### Real early exit", "### Batch-1 latency"):
        assert heading in out, heading
    assert "| deit_tiny_patch16_224 |" in out and "| stage 3 relation reuse |" in out
    # one pool per batch size (the smallest multiple of 7 and of the batch from --pool on): the budget's shares
    head = "| DVT_tiny | deit_tiny_patch16_224 | fp32 |"
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith(head)]
    assert [(r[3], r[4]) for r in rows] == [("1", "28"), ("8", "56")]
    # the thresholds are fitted on the pool at the timed batch size; kernels of the smaller sub-batches
    # round differently, which may move an image that sits on a threshold (it did under the AVX2 caps)
    shares = [float(q) for q in rows[1][5].split(" / ")]
    assert all(abs(q - t) <= 2 / 56 for q, t in zip(shares, (4 / 7, 2 / 7, 1 / 7))), shares
    assert rows[0][14] != "-" and rows[1][14] == "-"  # batch-1 latency only at batch 1
    # --latency: early exit's median by the exit an image leaves at, "-" where none left there
    latency = [line.rstrip(" |").split(" | ") for line in out.split("### Batch-1 latency")[1].splitlines()
               if line.startswith("| DVT_tiny | fp32 |")]
    assert len(latency) == 1
    left = [int(round(float(q) * 3)) for q in latency[0][9].split(" / ")]  # exit shares of the 3 images
    by_exit = latency[0][10].split(" / ")
    assert sum(left) == 3 and len(by_exit) == 3
    assert all((cell == "-") == (n == 0) for cell, n in zip(by_exit, left)), (left, by_exit)
    assert all(float(cell) > 0 for cell in by_exit if cell != "-")
    assert rows[0][12] == "-" and float(rows[1][12]) > 0 and rows[1][13].endswith("x")  # queued: from batch 2 on
    # --whole-last-blocks: early exit against itself with every stage's last block whole, same rounds
    table = out.split("last block whole (same rounds)")[1].split("Where the time goes")[0]
    whole = [line.split(" | ") for line in table.splitlines() if line.startswith("| DVT_tiny | fp32 |")]
    assert [r[2] for r in whole] == ["1", "8"] and all(float(r[4]) > 0 and r[5].endswith("x") for r in whole)
    assert whole[0][6] == "-" and float(whole[1][7]) > 0
    # --parts: each model's time part by part; the parts add up to the whole, the static model has no reuse paths
    table = out.split("Where the time goes")[1].split("###")[0]
    parts = {(r[2], r[3]): r[4:] for r in (line.rstrip(" |").split(" | ") for line in table.splitlines()
                                           if line.startswith("| DVT_tiny | fp32 |"))}
    assert [p for b, p in parts if b == "8"] == [*bench.PARTS, "all of it", "operator calls per image"]
    calls = [int(c) for c in parts["8", "operator calls per image"]]  # early exit, queued, static
    assert min(calls) > 0 and calls[0] > calls[2]  # three stages and their reuse paths against one stage
    assert parts["1", "operator calls per image"][1] == "-"
    ms = lambda cell: float(cell.split(" (")[0])  # noqa: E731
    for column in range(3):
        cells = [parts["8", p][column] for p in bench.PARTS if parts["8", p][column] != "-"]
        assert sum(map(ms, cells)) == pytest.approx(ms(parts["8", "all of it"][column]), abs=0.02 * len(cells))
    assert all(ms(parts["8", "transformer blocks"][c]) > 0 for c in range(3))
    assert ms(parts["8", "relation reuse: convolutions"][0]) > 0 and ms(parts["8", "grid resampling"][1]) > 0
    assert parts["8", "relation reuse: convolutions"][2] == parts["8", "feature reuse: MLPs"][2] == "-"
    assert parts["1", "embedding"][1] == "-"  # queued from batch 2 on
    # options of --early-exit: refused without it, not ignored
    for flags in (["--parts"], ["--whole-last-blocks"], ["--pool", "28"], ["--ee-compile"]):
        with pytest.raises(SystemExit):
            bench.parse_args(flags)
        assert "pass --early-exit too" in capfd.readouterr().err
    for flag in ("--parts", "--whole-last-blocks"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--early-exit", "--ee-compile", flag])
        assert "--ee-compile times the compiled graphs whole" in capfd.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--early-exit", "--pool", "0"])
    assert "--pool needs at least 1 image" in capfd.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--products", "0"])
    assert "--products takes row counts of at least 1" in capfd.readouterr().err
    assert [bench.pool_size(b) for b in (1, 8, 16, 32, 64)] == [112, 112, 112, 224, 448]  # the default pools
    assert bench.static_for("DVT_T2t_vit_14", bench.parse_args([])) == "T2T-ViT-14"
    assert bench.static_for("DVT_Deit_small", bench.parse_args(["--static", "DVT_Deit_small=vit_small_patch16_224"])) \
        == "vit_small_patch16_224"
    static = bench.build_static("T2T-ViT-14", 224, torch.device("cpu"), torch.float32)
    assert static.num_exits == 1 and static.stages[0].grid == 14 and static.stages[0].depth == 14
    # DeiT-S in this code's kernels: the architecture of timm's deit_small_patch16_224, its multiply-adds
    ours = bench.build_static("DeiT-S", 224, torch.device("cpu"), torch.float32)
    timm_deit = bench.build_static("deit_small_patch16_224", 224, torch.device("cpu"), torch.float32)
    assert ours.num_exits == 1 and ours.stages[0].grid == 14 and ours.stages[0].depth == 12
    assert bench.model_gmacs(ours, 224) == pytest.approx(bench.model_gmacs(timm_deit, 224), rel=1e-3)
    bench.check_model_names(argparse.ArgumentParser(), bench.parse_args(["--static", "DVT_Deit_small=DeiT-S"]))
    # --products: 3 blocks x 4 linear layers at 2 and 300 rows, and how many float32 inference packs here
    from models import layers
    if layers.fused_linear_works(torch.float32) and layers.packing_works():
        table = out.split("plain against packed products")[1]
        products = [line.rstrip(" |").split(" | ") for line in table.splitlines() if line.startswith("| DVT_tiny |")]
        assert [(r[1], r[2]) for r in products] == [("2", "12"), ("300", "12")]
        assert all(float(r[3]) > 0 and float(r[4]) > 0 and float(r[7]) > 0 for r in products)
        # GFLOP/s of the packed products, and streamed over in-cache weights, from the columns' own times
        tiny = bench.build("DVT_tiny", 64, torch.device("cpu"), torch.float32).stages[0].blocks
        weights = sum(layer.weight.numel() for b in tiny for layer in (b.attn.qkv, b.attn.proj, b.mlp.fc1, b.mlp.fc2))
        for r in products:
            assert float(r[6]) == pytest.approx(2 * int(r[1]) * weights / (float(r[4]) * 1e-3) / 1e9, rel=0.1, abs=1)
            assert float(r[8].rstrip("x")) == pytest.approx(float(r[4]) / float(r[7]), rel=0.1)
        capability = torch.backends.cpu.get_cpu_capability()
        # DVT_tiny's weights are below AVX2_PACKED_MIN_WEIGHT: packed with AVX-512 code only
        assert [r[9] for r in products] == (["12", "12"] if capability == "AVX512" else ["0", "0"])
    else:
        assert "--products left out" in out


@pytest.mark.slow
def test_speed_benchmark_compiles_both_sides(capfd):
    """scripts/benchmark.py --early-exit --ee-compile: early exit and the static model both
    compiled with freezing (the warm-up round compiles), at batch 1 and 4; --compile's table."""
    torch._dynamo.reset()
    bench = load_script("benchmark")
    code = bench.main(["--models", "DVT_tiny", "--img-size", "32", "--repeats", "1", "--threads", "1", "--dtypes",
                       "fp32", "--static", "DVT_tiny=deit_tiny_patch16_224", "--no-all-exits", "--early-exit",
                       "--ee-compile", "--ee-batches", "1", "4", "--pool", "28", "--compile", "--batch", "4"])
    out = capfd.readouterr().out
    assert code == 0
    assert "against the static model, both compiled (inductor, freezing)" in out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| DVT_tiny | deit_tiny_patch16_224 |")]
    assert [(r[3], r[4]) for r in rows] == [("1", "28"), ("4", "28")]
    assert all(float(r[7]) > 0 and float(r[8]) > 0 and r[9].endswith("x") for r in rows)
    compiled = [line.rstrip(" |").split(" | ") for line in out.split("### torch.compile against eager")[1].splitlines()
                if line.startswith("| DVT_tiny | fp32 |")]
    assert [r[2] for r in compiled] == ["all exits", "early exit"] and all(float(r[-1]) < 1e-4 for r in compiled)


def test_speed_benchmark_times_a_static_model_of_this_code(capfd):
    """scripts/benchmark.py --baseline DeiT-S: timm's DeiT-S and the one built from this code's
    kernels in the same rounds, labelled apart, with the same multiply-adds."""
    bench = load_script("benchmark")
    code = bench.main(["--models", "deit_small_patch16_224", "--baseline", "DeiT-S", "--batch", "1", "--repeats", "1",
                       "--threads", "1", "--dtypes", "fp32"])
    out = capfd.readouterr().out
    rows = {r[0]: r for r in (line.strip("| ").split(" | ") for line in out.splitlines())
            if r[0] in ("deit_small_patch16_224", "DeiT-S") and len(r) == 9}  # the all-exits table
    assert code == 0 and rows["DeiT-S"][2] == "this code (static)" and rows["deit_small_patch16_224"][2] == "this"
    assert rows["DeiT-S"][1] == rows["deit_small_patch16_224"][1] == "4.599"  # GMACs per image
    assert "Per-FLOP throughput against DeiT-S" in out


def test_part_timer_counts_each_part_once_and_leaves_the_model_as_it_was():
    """benchmark.PartTimer: the parts of a cascade timed in one call without changing its answers,
    the wrappers gone again afterwards, and a part's time without that of the timed parts it calls."""
    bench = load_script("benchmark")
    model = timm.create_model("DVT_tiny", img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        timer = bench.PartTimer(torch.device("cpu"))
        timer.wrap_model(model)
        start = time.perf_counter()
        out = model(x)
        total = time.perf_counter() - start
        timer.close()
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    assert set(timer.seconds) <= set(bench.PARTS) and timer.seconds["transformer blocks"] > 0
    assert sum(timer.seconds.values()) <= total
    assert all(not any(name in vars(m) for name in ("forward", "embed", "finish", "_relation_biases"))
               for m in model.modules())

    class Toy:
        def outer(self):
            time.sleep(0.01)
            self.inner()

        def inner(self):
            time.sleep(0.2)

    toy, timer = Toy(), bench.PartTimer(torch.device("cpu"))
    timer.wrap(toy, "outer", "outer")
    timer.wrap(toy, "inner", "inner")
    toy.outer()
    timer.close()
    assert timer.seconds["inner"] >= 0.2 and 0.01 <= timer.seconds["outer"] < 0.2  # not 0.21: inner's time is inner's
    assert vars(toy) == {}


@pytest.mark.parametrize("native", [True, False])
def test_speed_benchmark_times_bf16_only_where_native(native, monkeypatch, capsys):
    """Emulated bf16 (an AVX2-only CPU) takes minutes and says nothing of the model: left out
    by default, with the reason."""
    bench = load_script("benchmark")
    monkeypatch.setattr(bench, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(bench, "matmul_peak", lambda dtype, device: 100.0)
    assert bench.default_dtypes(torch.device("cpu")) == (["fp32", "bf16"] if native else ["fp32"])
    assert bench.default_dtypes(torch.device("cuda")) == ["fp32", "bf16", "fp16"]
    assert bench.main(["--models", "DVT_tiny", "--img-size", "64", "--batch", "2", "--repeats", "1", "--threads", "1",
                       "--baseline", "deit_tiny_patch16_224"]) == 0
    out = capsys.readouterr().out
    assert ("bf16 left out: this CPU has no native bfloat16" in out) is not native
    assert ("| this | bf16 |" in out) is native


def test_machine_line_names_the_allocator(monkeypatch):
    """CPU timings at large batches depend on the allocator's settings (page faults): the machine
    line under every benchmark table says which were in force."""
    bench = load_script("benchmark")
    for name in bench.ALLOCATOR_ENV:
        monkeypatch.delenv(name, raising=False)
    assert "; allocator: default;" in bench.machine_description(torch.device("cpu"))
    tunables = "glibc.malloc.mmap_threshold=268435456:glibc.malloc.trim_threshold=1073741824"
    monkeypatch.setenv("GLIBC_TUNABLES", tunables)
    assert f"; allocator: GLIBC_TUNABLES={tunables};" in bench.machine_description(torch.device("cpu"))


def test_speed_benchmark_refuses_models_it_cannot_time(capsys):
    """scripts/benchmark.py names a mistyped model and a static model given to a section that times
    a cascade's stages, before anything is built; a static model alone is timed (all exits)."""
    bench = load_script("benchmark")
    refused = {
        ("--models", "DVT_deit_small"): "unknown model 'DVT_deit_small' (did you mean DVT_Deit_small?)",
        ("--baseline", "deit_smal_patch16_224"): "unknown model 'deit_smal_patch16_224'",
        ("--models", "DVT_tiny", "--early-exit", "--static", "DVT_tiny=vit_tinny_patch16_224"):
            "unknown model 'vit_tinny_patch16_224'",
        ("--models", "DVT_Deit_small", "--early-exit", "--static", "DVT_Deit_small=DeiT-s"):
            "unknown model 'DeiT-s': neither a DVT model (DVT_T2t_vit_12, DVT_T2t_vit_14, DVT_Deit_small, "
            "DVT_Deit_small_49_196, DVT_Vit_base_49_196, DVT_tiny) nor a timm model; or a static model built from "
            "this code: T2T-ViT-14, T2T-ViT-12, DeiT-S",
        ("--models", "deit_tiny_patch16_224", "--stages"):
            "--stages times the stages of DVT cascades; deit_tiny_patch16_224 is not one (DVT models: DVT_T2t_vit_12",
        ("--models", "DVT_tiny", "deit_tiny_patch16_224", "resnet18", "--early-exit", "--products", "2"):
            "--early-exit and --products time the stages of DVT cascades; deit_tiny_patch16_224, resnet18 are not",
    }
    for argv, message in refused.items():
        with pytest.raises(SystemExit):
            bench.parse_args(list(argv))
        assert message in capsys.readouterr().err, argv
    assert bench.parse_args(["--models", "deit_tiny_patch16_224"]).models == ["deit_tiny_patch16_224"]
    assert bench.parse_args(["--early-exit", "--static", "DVT_T2t_vit_14=T2T-ViT-14"]).early_exit


def test_early_exit_benchmark_runs(capsys):
    bench = load_script("bench_early_exit")
    code = bench.main(["--models", "DVT_tiny", "--batch_size", "8", "--budgets", "10", "40", "--iters", "1",
                       "--warmup", "0", "--img_size", "112", "--devices", "cpu", "--threads", "1", "--profile"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("command: python ") and "machine: " in out
    rows = [line for line in out.splitlines() if line.startswith("| DVT_tiny |")]
    assert len(rows) == 4  # two budgets, in the speed-up table and in the profile

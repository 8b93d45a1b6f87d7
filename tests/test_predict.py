"""Classifying one's own images: ``inference.py --predict`` and ``utils.predict.DVTClassifier``.

The predictions are checked against the simulated evaluation (every exit run, then the first
exit whose confidence reaches its threshold), against ``inference.py --eval_mode 1`` on the
same images, and against the budget table of a checkpoint in the released layout.
"""
from __future__ import annotations

import ast
import csv
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import ImageNetInfo
from torchvision import transforms
from torchvision.transforms import InterpolationMode

import inference
import models
from golden import VARIANTS, golden_state_dict, load_manifest
from helpers import REPO, SUBPROCESS_ENV, TINY
from models.dvt import to_original_state_dict
from models.factory import guess_model
from utils.predict.classifier import DVTClassifier
from utils.data.images import load_rgb
from utils.predict.sources import draft_size, iter_image_paths

IMG = 32  # model resolution: DVT_tiny at 32 pixels runs in milliseconds
CLASSES = ("ant", "bee", "cow")
SIZES = ((40, 30), (36, 36), (30, 50), (64, 48))  # (width, height); the transform resizes them
FLOPS = [0.01, 0.03, 0.07]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(num_classes: int = len(CLASSES), seed: int = 0) -> models.DVT:
    """A random DVT_tiny with scaled-up heads, so confidences spread out."""
    torch.manual_seed(seed)
    model = models.build_dvt("DVT_tiny", num_classes=num_classes, img_size=IMG)
    with torch.no_grad():
        for stage in model.stages:
            stage.head.weight.mul_(30.0)
    return model.eval()


def write_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rs = np.random.RandomState(seed)
    paths = []
    for i in range(count):
        w, h = SIZES[i % len(SIZES)]
        paths.append(folder / f"{i:03d}.png")
        Image.fromarray(rs.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """``root/val/<class>/*.png``: 3 classes of 4 images."""
    root = tmp_path_factory.mktemp("labelled")
    for k, name in enumerate(CLASSES):
        write_images(root / "val" / name, 4, seed=k)
    return root


def eval_images(paths: list[Path]) -> torch.Tensor:
    """The evaluation transform written out: resize the short side to 32 / 0.875, center crop."""
    tf = transforms.Compose([
        transforms.Resize(int(IMG / 0.875), interpolation=InterpolationMode.BICUBIC), transforms.CenterCrop(IMG),
        transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    return torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])


def simulate(model: models.DVT, paths: list[Path], thresholds) -> dict[str, tuple[int, int, float]]:
    """Every exit on every image, then the first exit whose confidence reaches its threshold:
    path -> (class, exit 1..E, confidence)."""
    with torch.no_grad():
        probs = torch.stack(model(eval_images(paths))).softmax(dim=-1)  # (E, N, C)
    conf, pred = probs.max(dim=-1)
    out = {}
    for i, path in enumerate(paths):
        k = next(k for k in range(len(conf)) if k == len(conf) - 1 or conf[k, i] >= thresholds[k])
        out[str(path)] = (int(pred[k, i]), k + 1, float(conf[k, i]))
    return out


def exit_confidences(model: models.DVT, paths: list[Path]) -> torch.Tensor:
    """(E, N) top softmax probability of every exit."""
    with torch.no_grad():
        return torch.stack(model(eval_images(paths))).softmax(dim=-1).amax(dim=-1)


def spread_thresholds(conf: torch.Tensor, first: float, second: float) -> list[float]:
    """Thresholds half-way between neighbouring confidences ``conf`` (E, N), so a few ulps of
    difference with the batch composition cannot move an image across; ``first``/``second``:
    the share of the images to stop at exits 1 and 2 (of those reaching it)."""
    def cut(values: torch.Tensor, share: float) -> float:
        v = values.sort(descending=True).values.tolist()
        if len(v) < 2:
            return 2.0  # nobody stops here
        n = max(1, min(len(v) - 1, round(share * len(v))))
        return (v[n - 1] + v[n]) / 2

    t0 = cut(conf[0], first)
    t1 = cut(conf[1][conf[0] < t0], second)
    return [t0, t1, -1e8]


def val_paths(root: Path) -> list[Path]:
    return sorted((root / "val").rglob("*.png"))


def save(checkpoint: dict, path: Path) -> Path:
    torch.save(checkpoint, path)
    return path


def project_checkpoint(path: Path, model: models.DVT, **extra) -> Path:
    return save({"model": model.state_dict(), "model_name": "DVT_tiny",
                 "model_kwargs": {"num_classes": model.num_classes, "img_size": IMG}, **extra}, path)


def released_checkpoint(path: Path, model: models.DVT, **extra) -> Path:
    """The original release layout: original key names, results, no model name."""
    return save({"model_state_dict": to_original_state_dict(model.state_dict()), **extra}, path)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = inference.main([str(a) for a in argv] + ["--no_progress", "--device", "cpu", "--workers", "0"])
    out, err = capsys.readouterr()
    return code, out, err


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def summary_of(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("summary : ")]
    assert len(lines) == 1, err
    return lines[0]


def mean_gflops_reported(err: str) -> float:
    return float(re.search(r"mean ([0-9.eE+-]+) GFLOPs/image", summary_of(err)).group(1))


# -------------------------------------------------------------- the simulated evaluation

def test_predict_matches_simulated_evaluation(labelled, tmp_path, capsys):
    model = tiny_model()
    ckpt = project_checkpoint(tmp_path / "tiny.pth", model, flops=FLOPS)
    paths = val_paths(labelled)
    thresholds = spread_thresholds(exit_confidences(model, paths), 0.4, 0.5)
    expected = simulate(model, paths, thresholds)
    assert {e for _, e, _ in expected.values()} == {1, 2, 3}  # every exit is used
    out_csv = tmp_path / "preds.csv"
    code, _, err = run(capsys, "--checkpoint_path", ckpt, "--predict", labelled / "val", "--thresholds",
                       *thresholds[:2], "--output", out_csv, "--batch_size", 5)
    assert code == 0, err
    rows = read_csv(out_csv)
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    for r in rows:
        cls, exit_, conf = expected[r["path"]]
        assert (int(r["class_index"]), int(r["exit"])) == (cls, exit_), r
        assert float(r["confidence"]) == pytest.approx(conf, abs=2e-6)
        assert float(r["gflops"]) == FLOPS[exit_ - 1]
        assert r["class_name"] == "" and r["error"] == ""  # the checkpoint names no classes
    costs = [float(r["gflops"]) for r in rows]
    assert mean_gflops_reported(err) == pytest.approx(sum(costs) / len(costs), rel=1e-5)
    shares = ast.literal_eval(re.search(r"exit shares (\[[^]]*\])", summary_of(err)).group(1))
    assert shares == pytest.approx([sum(int(r["exit"]) == k for r in rows) / len(rows) for k in (1, 2, 3)], abs=1e-3)
    assert "given with --thresholds" in err


def test_budget_index_agrees_with_eval_mode_1(labelled, tmp_path, capsys):
    """The rows of the stored table, run image by image for real, give the accuracy and the
    average cost inference.py --eval_mode 1 computes for them by simulation."""
    model = tiny_model(seed=1)
    paths = val_paths(labelled)
    conf = exit_confidences(model, paths)
    rows = [spread_thresholds(conf, a, b) for a, b in ((0.2, 0.3), (0.5, 0.5), (0.8, 0.2))]
    ckpt = project_checkpoint(tmp_path / "rows.pth", model, flops=FLOPS, dynamic_threshold=torch.tensor(rows))
    code, out, err = run(capsys, "--checkpoint_path", ckpt, "--data_url", labelled, "--eval_mode", 1)
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith("budgeted_batch_classification : "))
    gflops, top1 = ast.literal_eval(line.partition(" : ")[2])
    for p in (1, 2, 3):
        out_csv = tmp_path / f"p{p}.csv"
        code, _, err = run(capsys, "--checkpoint_path", ckpt, "--predict", labelled / "val", "--budget_index", p,
                           "--output", out_csv)
        assert code == 0, err
        preds = read_csv(out_csv)
        right = sum(CLASSES[int(r["class_index"])] == Path(r["path"]).parent.name for r in preds)
        assert right * 100.0 / len(preds) == pytest.approx(top1[p - 1], abs=1e-9)
        assert sum(float(r["gflops"]) for r in preds) / len(preds) == pytest.approx(gflops[p - 1], rel=1e-6)
        assert mean_gflops_reported(err) == pytest.approx(gflops[p - 1], rel=1e-5)
        assert f"row {p} of the checkpoint's 3" in err


# ---------------------------------------------------------- budgets of a released file

def budget_table() -> tuple[list[float], list[float]]:
    """59 rows whose accuracy is not monotone in the cost, so 'the last row that fits' is wrong."""
    gflops = [0.012 + 0.001 * p for p in range(59)]
    top1 = [round(60 + 20 * abs(np.sin(p / 7.0)), 3) for p in range(59)]
    return gflops, top1


def implied_row(gflops: list[float], top1: list[float], budget: float) -> int:
    """1-based: the most accurate row of the table within the budget (the cheaper on ties)."""
    best = None
    for p, (g, a) in enumerate(zip(gflops, top1), start=1):
        if g <= budget and (best is None or a > top1[best - 1] or (a == top1[best - 1] and g < gflops[best - 1])):
            best = p
    return best


@pytest.fixture(scope="module")
def released(labelled, tmp_path_factory) -> tuple[Path, models.DVT, torch.Tensor]:
    model = tiny_model(seed=2)
    paths = val_paths(labelled)
    conf = exit_confidences(model, paths)
    rows = torch.tensor([spread_thresholds(conf, 0.1 + 0.6 * (p % 7) / 6, 0.3 + 0.1 * (p % 5)) for p in range(59)])
    gflops, top1 = budget_table()
    path = released_checkpoint(tmp_path_factory.mktemp("released") / "DVT_tiny.pth.tar", model, flops=FLOPS,
                               anytime_classification=[60.0, 70.0, 75.0], dynamic_threshold=rows,
                               budgeted_batch_classification=[gflops, top1])
    return path, model, rows


@pytest.mark.parametrize("budget", [0.0305, 0.05])
def test_budget_on_released_layout_picks_the_row_its_table_implies(released, labelled, budget, tmp_path, capsys):
    path, model, rows = released
    gflops, top1 = budget_table()
    p = implied_row(gflops, top1, budget)
    assert p not in (None, max(i for i, g in enumerate(gflops, 1) if g <= budget))  # not simply the last fitting
    out_csv = tmp_path / "b.csv"
    code, _, err = run(capsys, "--checkpoint_path", path, "--model", "DVT_tiny", "--img_size", IMG, "--predict",
                       labelled / "val", "--budget", budget, "--output", out_csv)
    assert code == 0, err
    assert f"row {p} of the checkpoint's 59" in err
    assert f"{top1[p - 1]:.2f}% top-1 at {gflops[p - 1]:.4g} GFLOPs/image" in err
    assert f"budget {budget:g}" in summary_of(err)
    expected = simulate(model, val_paths(labelled), rows[p - 1].tolist())
    assert {r["path"]: int(r["exit"]) for r in read_csv(out_csv)} == {k: v[1] for k, v in expected.items()}


def test_default_rule_and_model_found_from_the_weights(released, labelled, capsys):
    path, _, _ = released
    gflops, top1 = budget_table()
    near = [p for p in range(59) if top1[p] >= max(top1) - 0.5]
    p = min(near, key=lambda i: gflops[i]) + 1
    code, out, err = run(capsys, "--checkpoint_path", path, "--img_size", IMG, "--predict", labelled / "val")
    assert code == 0, err
    assert f"row {p} of the checkpoint's 59 (the default: the cheapest stored row within 0.5 points" in err
    assert "DVT_tiny" in err  # found from the layout of the weights: the file does not name its model
    rows = list(csv.DictReader(out.splitlines()))  # without --output, the rows go to stdout
    assert len(rows) == 12 and all(r["error"] == "" for r in rows)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_model_found_from_the_layout_of_released_weights(variant):
    weights = {key: torch.empty(shape, device="meta") for key, shape in load_manifest(variant)}
    name, feature_reuse, relation_reuse = VARIANTS[variant]
    assert guess_model(weights) == (name, dict(feature_reuse=feature_reuse, relation_reuse=relation_reuse))


def test_original_release_without_model_name(labelled, tmp_path, capsys):
    """A file in the released layout of DVT_T2t_vit_12 (original keys, numpy numbers in the
    results, 1,000 classes, no model name): recognised, budgeted, with ImageNet names."""
    _, top1 = budget_table()
    gflops = [0.5 + 0.05 * p for p in range(59)]  # within the model's 0.468 .. 3.455 GFLOPs
    rows = torch.tensor([[0.9 - 0.01 * p, 0.8 - 0.01 * p, -1e8] for p in range(59)])
    ckpt = save({"model_state_dict": golden_state_dict(load_manifest("DVT_T2t_vit_12"), "A"),
                 "flops": [np.float64(0.468), np.float64(1.446), np.float64(3.455)],
                 "anytime_classification": [69.1, 75.7, 80.0], "dynamic_threshold": rows,
                 "budgeted_batch_classification": [[np.float64(g) for g in gflops], top1]},
                tmp_path / "DVT_T2t_vit_12.pth.tar")
    p = implied_row(gflops, top1, 1.5)
    code, _, err = run(capsys, "--checkpoint_path", ckpt, "--predict", labelled / "val" / "ant" / "000.png",
                       labelled / "val" / "bee" / "001.png", "--budget", 1.5, "--output", tmp_path / "p.csv")
    assert code == 0, err
    assert "DVT_T2t_vit_12: 3 exits at [0.468, 1.446, 3.455] GFLOPs, 224 px, 1000 classes (names: ImageNet's" in err
    assert f"row {p} of the checkpoint's 59" in err
    info = ImageNetInfo()
    assert [r["class_name"] for r in read_csv(tmp_path / "p.csv")] == [
        info.index_to_description(int(r["class_index"])) for r in read_csv(tmp_path / "p.csv")]


# ------------------------------------------------------------------------ class names

def test_imagenet_names_for_1000_classes_and_overrides(labelled, tmp_path, capsys):
    model = tiny_model(num_classes=1000, seed=3)
    ckpt = released_checkpoint(tmp_path / "in1k.pth.tar", model)
    images = labelled / "val" / "ant"
    info = ImageNetInfo()
    code, _, err = run(capsys, "--checkpoint_path", ckpt, "--model", "DVT_tiny", "--img_size", IMG, "--predict",
                       images, "--output", tmp_path / "d.csv", "--topk", 3)
    assert code == 0, err
    assert "every image runs to the last exit" in err  # no stored thresholds
    for r in read_csv(tmp_path / "d.csv"):
        assert r["class_name"] == info.index_to_description(int(r["class_index"]))
        assert r["top1_index"] == r["class_index"] and r["top1_name"] == r["class_name"]
        assert float(r["top1_prob"]) >= float(r["top2_prob"]) >= float(r["top3_prob"])
        assert r["exit"] == "3"
    code, _, err = run(capsys, "--checkpoint_path", ckpt, "--model", "DVT_tiny", "--img_size", IMG, "--predict",
                       images, "--output", tmp_path / "n.csv", "--label_type", "name")
    assert code == 0, err
    assert all(r["class_name"] == info.index_to_label_name(int(r["class_index"])) for r in read_csv(tmp_path / "n.csv"))
    names = tmp_path / "names.txt"
    names.write_text("".join(f"thing {k}\n" for k in range(1000)))
    code, _, err = run(capsys, "--checkpoint_path", ckpt, "--model", "DVT_tiny", "--img_size", IMG, "--predict",
                       images, "--output", tmp_path / "o.csv", "--class-names", names)
    assert code == 0, err
    assert all(r["class_name"] == f"thing {r['class_index']}" for r in read_csv(tmp_path / "o.csv"))


def test_class_names_round_trip_from_training(tmp_path, capsys):
    import main as train_main

    data = tmp_path / "data"
    for k, name in enumerate(CLASSES):
        write_images(data / "train" / name, 4, seed=k)
        write_images(data / "val" / name, 2, seed=10 + k)
    assert train_main.main([str(data), "--config", TINY, "--device", "cpu",
                            "--output", str(tmp_path / "out"), "--experiment", "names", "--epochs", "1"]) == 0
    capsys.readouterr()
    run_dir = tmp_path / "out" / "train" / "names"
    choices = {"released.pth.tar": "(the default: the cheapest stored row",  # with the stored table
               "last.pth.tar": "every image runs to the last exit"}  # a training checkpoint has none
    for ckpt, choice in choices.items():
        out_csv = tmp_path / f"{ckpt}.csv"
        code, _, err = run(capsys, "--checkpoint_path", run_dir / ckpt, "--predict", data / "val", "--output", out_csv)
        assert code == 0, err
        assert "names: the checkpoint's" in err and choice in err
        rows = read_csv(out_csv)
        assert len(rows) == 6 and all(r["class_name"] == CLASSES[int(r["class_index"])] for r in rows)


def test_checkpoint_class_names_in_jsonl(labelled, tmp_path, capsys):
    model = tiny_model(seed=4)
    ckpt = project_checkpoint(tmp_path / "named.pth", model, class_names=list(CLASSES))
    out = tmp_path / "p.jsonl"
    code, _, err = run(capsys, "--checkpoint_path", ckpt, "--predict", labelled / "val" / "bee", "--output", out,
                       "--topk", "--thresholds", 0.5, 0.5)
    assert code == 0, err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 4
    for r in records:
        assert r["class_name"] == CLASSES[r["class_index"]] and r["error"] is None
        assert r["topk_index"][0] == r["class_index"] and len(r["topk_index"]) == 3  # top-5 of 3 classes
        assert r["topk_name"] == [CLASSES[i] for i in r["topk_index"]]
        assert sum(r["topk_prob"]) == pytest.approx(1.0, abs=1e-5)


# --------------------------------------------------------------------- bad input

def test_corrupt_image_gives_one_error_row(labelled, tmp_path, capsys):
    folder = tmp_path / "photos"
    good = write_images(folder / "a", 5) + write_images(folder / "b" / "c", 3, seed=1)
    (folder / "a" / "002_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (folder / ".hidden.png").write_bytes(b"ignored")
    (folder / "notes.md").write_text("not an image name: ignored")
    ckpt = project_checkpoint(tmp_path / "tiny.pth", tiny_model())
    code, _, err = inference.main(["--checkpoint_path", str(ckpt), "--predict", str(folder), "--output",
                                   str(tmp_path / "p.csv"), "--workers", "2", "--batch_size", "2", "--device", "cpu",
                                   "--no_progress"]), *capsys.readouterr()
    assert code == 0, err
    rows = read_csv(tmp_path / "p.csv")
    errors = [r for r in rows if r["error"]]
    assert [r["path"] for r in errors] == [str(folder / "a" / "002_broken.png")]
    assert errors[0]["class_index"] == "" and "002_broken.png" in errors[0]["error"]
    assert sorted(r["path"] for r in rows if not r["error"]) == sorted(map(str, good))
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)  # input order, with two workers
    assert "8 images (1 unreadable)" in summary_of(err)


def bad_cases(root: Path, ckpt: Path, bare: Path) -> dict[str, tuple[list, str]]:
    val = root / "val"
    return {
        "missing image": (["--checkpoint_path", ckpt, "--predict", root / "nowhere.jpg"], "no such file or folder"),
        "a URL": (["--checkpoint_path", ckpt, "--predict", "https://example.com/cat.jpg"],
                  "no such file or folder: https://example.com/cat.jpg (images are read from files here, not fetched"),
        "output suffix": (["--checkpoint_path", ckpt, "--predict", val, "--output", root / "p.txt"],
                          "must end in .csv or .jsonl"),
        "output folder": (["--checkpoint_path", ckpt, "--predict", val, "--output", val],
                          f"{val} is a folder; name a .csv or .jsonl file (e.g. {val / 'preds.csv'})"),
        "thresholds count": (["--checkpoint_path", ckpt, "--predict", val, "--thresholds", 0.5],
                             "the model has 3 exits: give 2 thresholds"),
        "budget below every row": (["--checkpoint_path", ckpt, "--predict", val, "--budget", 0.001],
                                   "below every stored row"),
        "budget index": (["--checkpoint_path", ckpt, "--predict", val, "--budget_index", 60], "rows 1 to 59"),
        "budget without a table": (["--checkpoint_path", bare, "--predict", val, "--budget", 1],
                                   "no 'dynamic_threshold' entry"),
        "two budgets": (["--checkpoint_path", ckpt, "--predict", val, "--budget", 1, 2], "one --budget"),
        "class names count": (["--checkpoint_path", ckpt, "--predict", val, "--class-names", root / "val" / "two.txt"],
                              "lists 2 class names, but the model has 3 classes"),
        "fp16 on the CPU": (["--checkpoint_path", ckpt, "--predict", val, "--amp", "fp16"], "fp16"),
    }


@pytest.mark.parametrize("case", list(bad_cases(Path("r"), Path("c"), Path("b"))))
def test_bad_input_gives_one_clear_line(case, labelled, released, tmp_path, capsys):
    (labelled / "val" / "two.txt").write_text("x\ny\n")
    bare = project_checkpoint(tmp_path / "bare.pth", tiny_model())
    argv, message = bad_cases(labelled, released[0], bare)[case]
    code, out, err = run(capsys, *argv, "--model", "DVT_tiny", "--img_size", IMG)
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("error: ") and message in err.strip().splitlines()[-1], err
    assert "Traceback" not in err and out == ""
    assert not (labelled / "p.txt").exists()


# ------------------------------------------------------------------------- the API

def test_api_on_pil_images_paths_tensors_and_list_files(labelled, tmp_path):
    model = tiny_model()
    ckpt = project_checkpoint(tmp_path / "tiny.pth", model, class_names=list(CLASSES), flops=FLOPS)
    paths = val_paths(labelled)
    thresholds = spread_thresholds(exit_confidences(model, paths), 0.4, 0.5)
    clf = DVTClassifier.from_checkpoint(ckpt, thresholds=thresholds[:2])
    expected = simulate(model, paths, thresholds)
    by_path = clf.predict([str(p) for p in paths], topk=2)
    by_image = clf.predict([Image.open(p) for p in paths])
    by_array = clf.predict([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    stacked = clf.predict(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths[::4]]))  # one size
    assert [r.index for r in stacked] == [r.index for r in by_array[::4]]
    assert [r.confidence for r in stacked] == pytest.approx([r.confidence for r in by_array[::4]], abs=2e-6)
    by_tensor = clf.predict(eval_images(paths))
    listed = tmp_path / "list.txt"
    listed.write_text("\n".join(map(str, reversed(paths))) + "\n\n")
    streamed = list(clf.predict_paths([listed], batch_size=3))
    assert [p.path for p in streamed] == [str(p) for p in reversed(paths)]
    for rows in (by_path, by_image, by_array, by_tensor, streamed[::-1]):
        assert [(r.index, r.exit) for r in rows] == [expected[str(p)][:2] for p in paths]
        assert [r.confidence for r in rows] == pytest.approx([expected[str(p)][2] for p in paths], abs=2e-6)
        assert [r.name for r in rows] == [CLASSES[r.index] for r in rows]
        assert [r.gflops for r in rows] == [FLOPS[r.exit - 1] for r in rows]
    assert all(r.topk_index[0] == r.index and len(r.topk_name) == 2 for r in by_path)
    with pytest.raises(ValueError, match=r"uint8 arrays of shape \(H, W, 3\).*got float32 of shape \(3, 36, 36\)"):
        clf.predict(np.zeros((3, 36, 36), np.float32))
    broken = clf.predict([tmp_path / "list.txt", paths[0]])
    assert broken[0].error and broken[0].index is None and broken[1].index == expected[str(paths[0])][0]


def test_photos_are_classified_as_a_viewer_shows_them(tmp_path, capsys):
    """A portrait photo stored as landscape pixels with EXIF orientation 6 (turn 90 degrees
    clockwise) gets the prediction of the upright image, by path, as a PIL image and with
    --predict."""
    model = tiny_model()
    ckpt = project_checkpoint(tmp_path / "tiny.pth", model, class_names=list(CLASSES), flops=FLOPS)
    shown = np.random.RandomState(5).randint(0, 256, (48, 30, 3), dtype=np.uint8)  # portrait (H 48, W 30)
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(shown).save(photos / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(np.rot90(shown, 1))).save(photos / "tagged.png", exif=exif)
    clf = DVTClassifier.from_checkpoint(ckpt, thresholds=[2.0, 2.0])  # every image to the last exit
    upright, by_path = clf.predict([photos / "upright.png", photos / "tagged.png"])
    by_image = clf.predict(Image.open(photos / "tagged.png"))[0]
    assert upright.error is None and by_path.error is None
    for row in (by_path, by_image):
        assert (row.index, row.exit) == (upright.index, 3) and row.confidence == pytest.approx(upright.confidence)
    code, _, err = run(capsys, "--checkpoint_path", ckpt, "--predict", photos, "--thresholds", 2.0, 2.0,
                       "--output", tmp_path / "preds.csv")
    rows = {Path(r["path"]).name: r for r in read_csv(tmp_path / "preds.csv")}
    assert code == 0 and rows["tagged.png"]["confidence"] == rows["upright.png"]["confidence"]
    assert "left out" not in err  # only images in the folder
    with torch.no_grad():  # what datasets read: the stored pixels
        stored = model(eval_images([photos / "tagged.png"]))[-1].softmax(-1).amax()
    assert float(stored) != pytest.approx(upright.confidence, abs=1e-4)


def test_phone_and_browser_formats_are_read_or_named(tmp_path, capsys):
    """.jfif (browsers' JPEG), AVIF (read by Pillow 11.2 on) and HEIC (an iPhone's photos, read
    with the pillow-heif plugin) get a row each: a class, or an error that says what to install."""
    from PIL import features

    photos = tmp_path / "photos"
    photos.mkdir()
    pixels = np.random.RandomState(0).randint(0, 256, (40, 30, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(photos / "web.jfif", format="JPEG")
    reads_avif = "avif" in features.modules and features.check_module("avif")
    if reads_avif:
        Image.fromarray(pixels).save(photos / "android.avif")
    else:
        (photos / "android.avif").write_bytes(b"\x00\x00\x00\x1cftypavif" + bytes(64))
    (photos / "iphone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))  # no decodable content
    for name in ("live.MOV", "live.aae", ".DS_Store"):  # a phone's video and sidecar, a hidden file
        (photos / name).write_bytes(b"x")
    ckpt = project_checkpoint(tmp_path / "tiny.pth", tiny_model(), class_names=list(CLASSES), flops=FLOPS)
    code, _, err = run(capsys, "--checkpoint_path", ckpt, "--predict", photos, "--output", tmp_path / "preds.csv")
    rows = {Path(r["path"]).name: r for r in read_csv(tmp_path / "preds.csv")}
    assert code == 0 and sorted(rows) == ["android.avif", "iphone.heic", "web.jfif"], err
    assert "--predict: left out 2 files of other types (1 .aae, 1 .mov); images are read from .jpg," in err
    assert rows["web.jfif"]["class_index"] and not rows["web.jfif"]["error"]
    assert bool(rows["android.avif"]["class_index"]) == reads_avif
    assert reads_avif or "Pillow 11.2 or newer" in rows["android.avif"]["error"]
    assert "pip install pillow-heif" in rows["iphone.heic"]["error"] or importlib.util.find_spec("pillow_heif")


def test_large_jpegs_are_decoded_at_a_reduced_scale_close_to_the_full_decode(tmp_path):
    """A photo many times the model's size is decoded at 1/2 or 1/4 of its size (2x the resize or
    more), by path and streamed alike; the prediction stays that of the full decode."""
    model = tiny_model()
    ckpt = project_checkpoint(tmp_path / "tiny.pth", model, class_names=list(CLASSES), flops=FLOPS)
    clf = DVTClassifier.from_checkpoint(ckpt, thresholds=[2.0, 2.0])
    assert draft_size(clf.transform) == 2 * int(IMG / clf.data_config["crop_pct"])
    yy, xx = np.mgrid[0:600, 0:800]
    pixels = np.stack([np.sin(xx / 40.0), np.cos(yy / 30.0), np.sin((xx + yy) / 70.0)], -1) * 90 + 128
    Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "photo.jpg", quality=90)
    drafted = load_rgb(str(tmp_path / "photo.jpg"), draft=draft_size(clf.transform))
    assert drafted.size == (200, 150)
    expected = clf.classify(clf.transform(drafted)[None])[0]
    full = clf.classify(clf.transform(load_rgb(str(tmp_path / "photo.jpg")))[None])[0]
    for row in (clf.predict(tmp_path / "photo.jpg")[0], next(clf.predict_paths([tmp_path / "photo.jpg"]))):
        assert (row.index, row.confidence) == (expected.index, expected.confidence)
    assert full.index == expected.index and full.confidence == pytest.approx(expected.confidence, abs=5e-3)


def test_stream_answers_each_batch_as_classify_with_the_later_stages_on_full_batches(labelled, tmp_path):
    """classify_stream: one list of rows per batch, in order, equal to classify batch by batch,
    batches of unreadable files alone included (first, between and last); stages 2 and 3 run
    on ``queue`` images gathered across batches, fewer only at the end of the stream."""
    from utils.predict.sources import ImageBatch
    model = tiny_model()
    paths = val_paths(labelled)
    thresholds = spread_thresholds(exit_confidences(model, paths), 0.4, 0.5)
    clf = DVTClassifier.from_checkpoint(project_checkpoint(tmp_path / "tiny.pth", model), thresholds=thresholds[:2])
    images = torch.stack([clf.transform(Image.open(p).convert("RGB")) for p in paths])
    names = [str(p) for p in paths]

    def unreadable(*names):
        return ImageBatch(images[:0], list(names), ["cannot read"] * len(names))

    batches = [unreadable("a", "b"),
               ImageBatch(images[:4], names[:2] + ["c"] + names[2:4], [None, None, "bad", None, None]),
               ImageBatch(images[4:7], names[4:7], [None] * 3), unreadable("d"),
               ImageBatch(images[7:], names[7:], [None] * 5), unreadable("e")]
    calls = []
    steps = clf.model.exit_steps
    clf.model.exit_steps = lambda: [lambda x, *carry, k=k, step=step: calls.append((k, x.shape[0])) or step(x, *carry)
                                    for k, step in enumerate(steps())]
    streamed = list(clf.classify_stream(batches, topk=2, queue=3))
    del clf.model.exit_steps
    one_by_one = [clf.classify(*b, topk=2) for b in batches]
    assert [[r.path for r in rows] for rows in streamed] == [[r.path for r in rows] for rows in one_by_one]
    for got, want in zip(sum(streamed, []), sum(one_by_one, [])):
        assert (got.index, got.exit, got.error, got.topk_index) == (want.index, want.exit, want.error, want.topk_index)
        assert got.confidence == pytest.approx(want.confidence, abs=2e-6)
    assert {r.exit for r in sum(streamed, [])} == {None, 1, 2, 3}
    assert [n for k, n in calls if k == 0] == [4, 3, 5]
    for k in (1, 2):
        sizes = [n for stage, n in calls if stage == k]
        assert sizes and sizes[:-1] == [3] * (len(sizes) - 1) and 1 <= sizes[-1] <= 3


def test_image_paths_from_folders_lists_and_links(tmp_path):
    a = write_images(tmp_path / "top" / "a", 2)
    b = write_images(tmp_path / "top" / "b" / "deep", 1)
    (tmp_path / "top" / "b" / "deep" / "loop").symlink_to(tmp_path / "top", target_is_directory=True)
    (tmp_path / "top" / "._000.png").write_bytes(b"AppleDouble")
    listed = tmp_path / "list.txt"
    listed.write_text(f"{b[0]}\n\n{tmp_path / 'top' / 'a'}\n")
    assert list(iter_image_paths([tmp_path / "top"])) == [str(p) for p in a + b]  # the loop is walked once
    assert list(iter_image_paths([listed, a[1]])) == [str(p) for p in b + a + a[1:]]


def test_bf16_autocast(labelled, tmp_path, capsys):
    ckpt = project_checkpoint(tmp_path / "tiny.pth", tiny_model())
    code, out, err = run(capsys, "--checkpoint_path", ckpt, "--predict", labelled / "val", "--amp", "bf16")
    assert code == 0, err
    assert len(list(csv.DictReader(out.splitlines()))) == 12


def test_command_line_in_a_real_process(labelled, tmp_path):
    ckpt = project_checkpoint(tmp_path / "tiny.pth", tiny_model(), class_names=list(CLASSES))
    proc = subprocess.run([sys.executable, "inference.py", "--checkpoint_path", str(ckpt), "--predict",
                           str(labelled / "val" / "cow"), str(labelled / "val" / "ant" / "000.png"), "--device", "cpu",
                           "--output", str(tmp_path / "p.csv")], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=SUBPROCESS_ENV)
    assert proc.returncode == 0, proc.stderr
    rows = read_csv(tmp_path / "p.csv")
    assert [Path(r["path"]).parent.name for r in rows] == ["cow"] * 4 + ["ant"]
    assert all(r["class_name"] in CLASSES for r in rows)
    assert "summary : 5 images (0 unreadable)" in proc.stderr


# ------------------------------------------------------------------------ memory

PEAK_RSS = ("import resource, sys, inference\n"
            "code = inference.main(sys.argv[1:])\n"
            "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
            "sys.exit(code)\n")


@pytest.mark.slow
def test_memory_stays_flat_over_10000_images(tmp_path):
    """Peak RSS of a whole run over 1,000 and over 10,000 images (a smaller cascade that
    stops every image at the first exit keeps this under a minute)."""
    folder = tmp_path / "many"
    rs = np.random.RandomState(0)
    for i in range(10_000):
        sub = folder / f"{i // 1000:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rs.randint(0, 256, (16, 16, 3), dtype=np.uint8)).save(sub / f"{i:05d}.png")
    torch.manual_seed(0)
    kwargs = {"num_classes": 3, "img_size": IMG, "depth": 1}
    ckpt = save({"model": models.build_dvt("DVT_tiny", **kwargs).state_dict(), "model_name": "DVT_tiny",
                 "model_kwargs": kwargs}, tmp_path / "small.pth")
    peaks = {}
    for name, source in (("1000", folder / "00"), ("10000", folder)):
        proc = subprocess.run(
            [sys.executable, "-c", PEAK_RSS, "--checkpoint_path", str(ckpt), "--predict", str(source), "--thresholds",
             "-1", "-1", "--output", str(tmp_path / f"{name}.csv"), "--device", "cpu", "--workers", "0",
             "--batch_size", "64", "--no_progress"],
            cwd=REPO, capture_output=True, text=True, timeout=600, env=SUBPROCESS_ENV)
        assert proc.returncode == 0, proc.stderr
        assert f"summary : {name} images (0 unreadable)" in proc.stderr
        peaks[name] = int(re.search(r"peak_rss_kib (\d+)", proc.stderr).group(1)) / 1024
    print(f"peak RSS: {peaks['1000']:.1f} MiB over 1,000 images, {peaks['10000']:.1f} MiB over 10,000")
    assert sum(1 for _ in open(tmp_path / "10000.csv")) == 10_001
    assert peaks["10000"] - peaks["1000"] < 20, peaks

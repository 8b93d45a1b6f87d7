"""The demo's parts: the easy-to-hard shapes dataset (utils/data/synthetic.py) and the picture of
which images leave at which exit (scripts/visualize_exits.py)."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets

import models
from helpers import REPO
from utils.budget.thresholds import exit_assignment
from utils.data.shapes import SHAPES, render_shape_image, stored_size
from utils.data.synthetic import difficulty_level, make_shapes_dataset, read_manifest
from utils.data.transforms import eval_transform

sys.path.insert(0, str(REPO / "scripts"))
import visualize_exits  # noqa: E402

SMALL = dict(num_classes=3, train_per_class=6, val_per_class=5, img_size=32, seed=3)


pytestmark = pytest.mark.usefixtures("one_thread")


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes") / "data"
    make_shapes_dataset(root, **SMALL, workers=0)
    return root


# ------------------------------------------------------------------------ generator

def test_same_seed_same_files_other_seed_other_files(tmp_path, shapes):
    again = make_shapes_dataset(tmp_path / "again", **SMALL, workers=2)  # processes do not change the files
    assert again.created
    assert tree_digest(again.root) == tree_digest(shapes)
    other = make_shapes_dataset(tmp_path / "other", **{**SMALL, "seed": 4})
    a, b = tree_digest(other.root), tree_digest(shapes)
    assert a.keys() == b.keys() and a != b


def test_layout_is_an_image_folder_with_a_matching_manifest(shapes):
    manifest = read_manifest(shapes)
    classes = sorted(SHAPES[:SMALL["num_classes"]])
    assert manifest["classes"] == classes
    side = stored_size(SMALL["img_size"], 0.875)
    for split, per_class in (("train", SMALL["train_per_class"]), ("val", SMALL["val_per_class"])):
        folder = datasets.ImageFolder(str(shapes / split))
        assert folder.classes == classes
        assert len(folder) == per_class * len(classes)
        by_path = {r["path"]: r for r in manifest["images"] if r["split"] == split}
        assert len(by_path) == len(folder)
        for path, target in folder.samples:
            record = by_path[str(Path(path).relative_to(shapes).as_posix())]
            assert record["label"] == target and record["class"] == classes[target]
        with Image.open(folder.samples[0][0]) as img:
            assert img.size == (side, side) and img.mode == "RGB"
    # the eval transform (resize to img_size / crop_pct, centre crop) gives the model its size
    with Image.open(next((shapes / "val").rglob("*.png"))) as img:
        assert eval_transform(SMALL["img_size"])(img.convert("RGB")).shape == (3, 32, 32)


def test_cached_unless_parameters_change(shapes, tmp_path):
    root = tmp_path / "cache"
    first = make_shapes_dataset(root, **SMALL)
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*.png")}
    second = make_shapes_dataset(root, **SMALL)
    assert first.created and not second.created
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.png")} == stamps
    # other parameters replace the tree, leaving nothing of the old one
    third = make_shapes_dataset(root, **{**SMALL, "train_per_class": 2})
    assert third.created and third.num_train == 2 * SMALL["num_classes"]
    assert len(list((root / "train").rglob("*.png"))) == third.num_train
    assert read_manifest(root)["parameters"]["train_per_class"] == 2
    # a missing image makes the cache incomplete: redrawn
    next(root.rglob("*.png")).unlink()
    assert make_shapes_dataset(root, **{**SMALL, "train_per_class": 2}).created
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".shapes-")]


def test_refuses_to_replace_a_foreign_folder_and_bad_parameters(tmp_path):
    foreign = tmp_path / "mine"
    (foreign / "train").mkdir(parents=True)
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a generated shapes dataset"):
        make_shapes_dataset(foreign, **SMALL)
    assert (foreign / "notes.txt").read_text() == "keep me"
    for bad in (dict(num_classes=1), dict(num_classes=len(SHAPES) + 1), dict(train_per_class=0),
                dict(img_size=8), dict(crop_pct=1.5), dict(difficulty_range=(0.5, 0.2)),
                dict(difficulty_power=0.0)):
        with pytest.raises(ValueError):
            make_shapes_dataset(tmp_path / "bad", **{**SMALL, **bad})
    assert not (tmp_path / "bad").exists()


def test_difficulty_spread_and_what_it_controls(shapes):
    records = read_manifest(shapes)["images"]
    for split, n in (("train", SMALL["train_per_class"]), ("val", SMALL["val_per_class"])):
        for name in SHAPES[:SMALL["num_classes"]]:
            d = np.sort([r["difficulty"] for r in records if r["split"] == split and r["class"] == name])
            # stratified: one difficulty in each of n equal bins of [0, 1]
            assert np.array_equal(np.floor(d * n), np.arange(n))
    assert {difficulty_level(r["difficulty"]) for r in records} == {"easy", "medium", "hard"}
    assert all(r["level"] == difficulty_level(r["difficulty"]) for r in records)
    d = np.array([r["difficulty"] for r in records])
    for key, sign in (("radius", -1), ("contrast", -1), ("shading", 1), ("clutter", 1)):
        assert sign * np.corrcoef(d, [r[key] for r in records])[0, 1] > 0.8, key


def test_difficulty_power_makes_easy_images_more_common(tmp_path):
    made = make_shapes_dataset(tmp_path / "skewed", **{**SMALL, "val_per_class": 12, "difficulty_power": 2.0})
    d = np.sort([r["difficulty"] for r in read_manifest(made.root)["images"]
                 if r["split"] == "val" and r["class"] == "circle"])
    assert np.array_equal(np.floor(np.sqrt(d) * 12), np.arange(12))
    assert (d < 1 / 3).mean() > 0.5

def test_easy_images_are_plain_and_hard_ones_are_not():
    easy, p_easy = render_shape_image("ring", 0.0, 48, seed=1)
    hard, p_hard = render_shape_image("ring", 1.0, 48, seed=1)
    assert easy.shape == hard.shape == (54, 54, 3)
    assert p_easy.clutter == 0 and p_easy.shading == 0 and p_hard.clutter >= 4
    assert p_easy.radius > 4 * p_hard.radius and p_easy.contrast > 1.5 * p_hard.contrast
    # the easy border is one plain colour; the shape stays inside the central crop
    border = np.concatenate([easy[:3].reshape(-1, 3), easy[-3:].reshape(-1, 3)])
    assert np.ptp(border.astype(int), axis=0).max() <= 1
    with pytest.raises(ValueError, match="unknown shape"):
        render_shape_image("hexagon", 0.5)


def test_command_line_reports_cached(tmp_path, capsys):
    from utils.data import synthetic

    args = [str(tmp_path / "cli"), "--num-classes", "2", "--train-per-class", "2", "--val-per-class", "2",
            "--img-size", "24"]
    assert synthetic.main(args) == 0
    assert synthetic.main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("wrote") and out[1].startswith("found (cached)")
    assert synthetic.main([str(tmp_path / "cli2"), "--num-classes", "9"]) == 1
    assert "num_classes" in capsys.readouterr().err


# -------------------------------------------------------------------- visualisation

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random-init DVT_tiny in this project's released layout (it names its model)."""
    torch.manual_seed(0)
    model = models.build_dvt("DVT_tiny", img_size=SMALL["img_size"], num_classes=SMALL["num_classes"])
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth.tar"
    thresholds = torch.tensor([[0.0, 0.0, -1e8], [1e8, 1e8, -1e8]])
    torch.save({"model_state_dict": model.state_dict(), "model_name": "DVT_tiny",
                "model_kwargs": dict(model.model_kwargs), "dynamic_threshold": thresholds}, path)
    return path


def _val_confidence(shapes: Path, checkpoint: Path) -> tuple[torch.Tensor, models.DVT]:
    """Every exit's confidence on the val split, (E, N), run in one batch as the script does."""
    ckpt = torch.load(checkpoint, weights_only=True)
    model = models.model_from_checkpoint(ckpt)
    model.load_state_dict(ckpt["model_state_dict"])
    model.eval()
    folder = datasets.ImageFolder(str(shapes / "val"), transform=eval_transform(SMALL["img_size"]))
    x = torch.stack([folder[i][0] for i in range(len(folder))])
    with torch.no_grad():
        conf = torch.stack([out.softmax(-1).amax(-1) for out in model(x)])
    return conf, model


def _between(values: torch.Tensor, q: float) -> float:
    """A threshold between two neighbouring values near quantile q: no sample sits on it."""
    v = values.sort().values
    i = min(max(int(q * len(v)), 1), len(v) - 1)
    return float((v[i - 1] + v[i]) / 2)


def test_groups_images_by_the_exit_forward_early_exit_takes(shapes, checkpoint, tmp_path):
    conf, model = _val_confidence(shapes, checkpoint)
    thresholds = [_between(conf[0], 0.6), _between(conf[1], 0.5)]
    out = tmp_path / "exits.png"
    args = visualize_exits.build_parser().parse_args([
        "--data_url", str(shapes), "--checkpoint_path", str(checkpoint), "--thresholds", *map(str, thresholds),
        "--out", str(out), "--per_exit", "4", "--batch_size", "7"])
    result = visualize_exits.visualize(args)
    exit_index = torch.tensor(result["exit_index"])
    full = torch.tensor(thresholds + [-1e8])
    assert torch.equal(exit_index, exit_assignment(conf, full))
    assert all(share > 0 for share in result["exit_shares"])
    assert sum(result["exit_shares"]) == pytest.approx(1.0)
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > img.height > 100


def test_budget_and_stored_thresholds(shapes, checkpoint, tmp_path, capsys):
    conf, model = _val_confidence(shapes, checkpoint)
    from utils.budget.flops import exit_gflops

    flops = exit_gflops(model, SMALL["img_size"])
    budget = (flops[0] + flops[1]) / 2
    out = tmp_path / "budget.png"
    assert visualize_exits.main(["--data", str(shapes), "--checkpoint", str(checkpoint), "--budget", str(budget),
                                 "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("exit 1 (7x7 tokens)") and "GFLOPs per image" in lines[-1]
    assert float(lines[-1].split(" at ")[1].split()[0]) <= budget * (1 + 1e-6)
    assert out.is_file()
    # row 1 of dynamic_threshold sends everyone out at exit 1, row 2 everyone to the last exit
    for row, exit_k in ((1, 0), (2, 2)):
        args = visualize_exits.build_parser().parse_args([
            "--data", str(shapes), "--checkpoint", str(checkpoint), "--budget_index", str(row), "--out", str(out)])
        assert set(visualize_exits.visualize(args)["exit_index"]) == {exit_k}


def test_released_file_without_model_name_is_recognised(shapes, checkpoint, tmp_path, capsys):
    """A file in the original release layout names no model: its weights say which it is; a
    --model that does not fit them is one line."""
    ckpt = torch.load(checkpoint, weights_only=True)
    released = tmp_path / "released.pth.tar"
    torch.save({"model_state_dict": models.to_original_state_dict(ckpt["model_state_dict"])}, released)
    common = ["--data", str(shapes), "--checkpoint", str(released), "--thresholds", "0.4", "0.4",
              "--out", str(tmp_path / "r.png"), "--img_size", "32"]
    assert visualize_exits.main(common + ["--model", "DVT_Deit_small"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not fit DVT_Deit_small" in err and "DVT_tiny" in err
    assert not (tmp_path / "r.png").exists()
    assert visualize_exits.main(common) == 0
    assert (tmp_path / "r.png").is_file()


@pytest.mark.parametrize("change, code, message", [
    ({"--data": "missing"}, 1, "dataset folder not found"),
    ({"--split": "test"}, 1, "no 'test/' folder"),
    ({"--checkpoint": "missing.pth.tar"}, 1, "checkpoint not found"),
    ({"--thresholds": ["0.5"] * 4}, 2, "--thresholds needs 2 values"),
    ({"--thresholds": None, "--budget": "1e-9"}, 2, "below the cost of the first exit"),
    ({"--thresholds": None, "--budget_index": "7"}, 2, "between 1 and 2"),
    ({"--out": "exits.jpg"}, 2, "must name a .png"),
])
def test_clear_errors(shapes, checkpoint, tmp_path, capsys, change, code, message):
    options = {"--data": str(shapes), "--checkpoint": str(checkpoint), "--thresholds": ["0.5", "0.5"],
               "--out": str(tmp_path / "e.png")}
    for key, value in change.items():
        if value is not None and key in ("--data", "--checkpoint", "--out") and not value.startswith("/"):
            value = str(tmp_path / value)
        options[key] = value
    argv = []
    for key, value in options.items():
        if value is not None:
            argv += [key, *value] if isinstance(value, list) else [key, value]
    assert visualize_exits.main(argv) == code
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_script_runs_from_anywhere_and_needs_a_threshold_source(shapes, checkpoint, tmp_path):
    script = REPO / "scripts" / "visualize_exits.py"
    done = subprocess.run([sys.executable, str(script), "--data", str(shapes), "--checkpoint", str(checkpoint),
                           "--out", str(tmp_path / "x.png")], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 2 and "one of the arguments" in done.stderr and "Traceback" not in done.stderr

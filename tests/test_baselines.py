"""Single-exit timm baselines through the cascade pipeline, main.py's --grad-checkpointing,
--layer-decay and --model-kwargs, and the MindSpore-recipe configs."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch

import inference
import main as train_main
from helpers import REPO, RESULT_KEYS, TINY, printed_results
from models.baseline import SingleExit
from models.factory import create_cascade
from utils.checkpoint.files import load_checkpoint_file
from utils.run.train_options import check_args, parse_args
from utils.train.model import initial_model
from utils.train.recipe import build_optimizer, scaled_lr

VIT = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "patch_size=8", "depth=2", "embed_dim=32", "num_heads=2"]
VIT_KWARGS = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)

pytestmark = pytest.mark.usefixtures("one_thread")


def train_args(data: Path, out: Path, name: str, *extra: str) -> list[str]:
    return [str(data), "--config", TINY, "--device", "cpu", "--output", str(out), "--experiment", name,
            "--epochs", "1", "--calib-size", "16", *extra]


def test_single_exit_wrapper_keeps_timm_keys_and_outputs():
    torch.manual_seed(0)
    model = create_cascade("vit_tiny_patch16_224", num_classes=4, **VIT_KWARGS).eval()
    plain = timm.create_model("vit_tiny_patch16_224", num_classes=4, **VIT_KWARGS).eval()
    assert isinstance(model, SingleExit) and model.num_exits == 1 and model.img_size == 32
    assert list(model.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(model.state_dict())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        (logits,) = model(x)
        assert torch.equal(logits, plain(x))
        assert torch.equal(model.forward_head(model.forward_features(x))[0], logits)
        out = model.forward_early_exit(x, [-1e8])
    assert torch.equal(out.logits, logits) and out.exit_index.tolist() == [0, 0, 0]
    again = create_cascade("vit_tiny_patch16_224", num_classes=4, **VIT_KWARGS)
    again.load_state_dict({f"module.{k}": v for k, v in plain.state_dict().items()})  # a DDP-saved file
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), plain.state_dict().values()))
    assert model.model_name == "vit_tiny_patch16_224" and model.model_kwargs == dict(num_classes=4, **VIT_KWARGS)
    with pytest.raises(ValueError, match="no feature reuse to switch off"):
        create_cascade("vit_tiny_patch16_224", feature_reuse=False)


def test_single_exit_layer_decay_and_grad_checkpointing():
    model = create_cascade("vit_tiny_patch16_224", num_classes=4, **VIT_KWARGS)
    optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, layer_decay=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    scales = {names[id(p)]: g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    assert scales["stages.0.head.weight"] == 1.0
    assert scales["stages.0.blocks.1.attn.qkv.weight"] == 0.5
    assert scales["stages.0.blocks.0.attn.qkv.weight"] == 0.25
    assert scales["stages.0.patch_embed.proj.weight"] == scales["stages.0.cls_token"] == 0.125
    model.set_grad_checkpointing(True)
    assert model.net.grad_checkpointing


def test_baseline_trains_releases_and_evaluates(tmp_path, image_data, capsys):
    """The whole pipeline with a timm model: one exit, the released layout, the three lines."""
    assert train_main.main(train_args(image_data, tmp_path, "vit", *VIT, "--grad-checkpointing",
                                      "--layer-decay", "0.65")) == 0
    folder = tmp_path / "train" / "vit"
    released = load_checkpoint_file(folder / "released.pth.tar")
    assert released["model_name"] == "vit_tiny_patch16_224" and released["dynamic_threshold"].shape == (59, 1)
    assert len(released["flops"]) == len(released["anytime_classification"]) == 1 and released["flops"][0] > 0
    plain = timm.create_model("vit_tiny_patch16_224", num_classes=3, **VIT_KWARGS)
    plain.load_state_dict(released["model_state_dict"])  # the timm model's own layout
    last = load_checkpoint_file(folder / "last.pth.tar")
    assert sorted({round(g["lr_scale"], 4) for g in last["optimizer"]["param_groups"]}) == [0.2746, 0.4225, 0.65, 1.0]
    capsys.readouterr()
    printed = {}
    for mode in ("0", "1", "2"):
        assert inference.main(["--data_url", str(image_data), "--batch_size", "8", "--checkpoint_path",
                               str(folder / "released.pth.tar"), "--eval_mode", mode, "--workers", "0",
                               "--no_progress", "--calib_size", "16"]) == 0
        printed[mode] = printed_results(capsys.readouterr().out)
    assert printed["0"] == {k: released[k] for k in RESULT_KEYS}
    for mode in ("1", "2"):  # one exit: every budget is that exit's cost and accuracy
        assert printed[mode]["flops"] == released["flops"]
        assert printed[mode]["anytime_classification"] == pytest.approx(released["anytime_classification"])
        gflops, top1 = printed[mode]["budgeted_batch_classification"]
        assert len(gflops) == 59 and top1 == pytest.approx(released["anytime_classification"] * 59)
        assert gflops == pytest.approx(released["flops"] * 59)


def test_flags_reach_the_model_and_optimizer(tmp_path, image_data):
    args = parse_args(train_args(image_data, tmp_path, "x", "--grad-checkpointing", "--layer-decay", "0.5",
                                 "--model-kwargs", "depth=2"))
    check_args(args)
    model = initial_model(args, 3)
    assert all(stage.grad_checkpointing for stage in model.stages) and all(len(s.blocks) == 2 for s in model.stages)
    assert model.model_kwargs["depth"] == 2
    scales = {g["lr_scale"] for g in build_optimizer(args, model, 1e-3).param_groups}
    assert scales == {1.0, 0.5, 0.25, 0.125}


@pytest.mark.parametrize("extra, message", [
    (["--layer-decay", "0.7", "--backbone-lr-scale", "0.1"], "pass one of them"),
    (["--layer-decay", "1.5"], r"--layer-decay must be in \(0, 1\]"),
    (["--model", "no_such_model"], "unknown model 'no_such_model'"),
    (["--model", "DVT_Deit_smal"], r"unknown model 'DVT_Deit_smal' \(did you mean DVT_Deit_small\?\): neither a DVT"),
    ([*VIT, "--no-relation-reuse"], "single-exit model"),
    (["--model-kwargs", "depth"], "expected KEY=VALUE"),
])
def test_bad_flags_are_clear_errors(tmp_path, image_data, capsys, extra, message):
    try:
        status = train_main.main(train_args(image_data, tmp_path, "bad", *extra))
    except SystemExit as e:  # argparse's own errors
        status = e.code
    assert status == 2  # bad options
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "train" / "bad").exists()


def test_mindspore_recipe_configs():
    expected_models = {
        "DVT_Deit_small_49_196_mindspore": ("DVT_Deit_small_49_196", 64, 8.875e-4),
        "baseline_deit_small_patch16_mindspore": ("deit_small_patch16_224", 256, 3.55e-3),
        "baseline_deit_small_patch32_mindspore": ("vit_small_patch32_224", 256, 3.55e-3),
        "baseline_vit_base_patch16_mindspore": ("vit_base_patch16_224", 64, 8.875e-4),
        "baseline_vit_base_patch32_mindspore": ("vit_base_patch32_224", 64, 8.875e-4),
    }
    for config, (model, batch, lr) in expected_models.items():
        args = parse_args(["DATA", "--config", str(REPO / "configs" / f"{config}.yaml")])
        assert (args.model, args.batch_size) == (model, batch)
        assert scaled_lr(args, world_size=8) == pytest.approx(lr)  # 8 processes, as the port
        assert (args.warmup_epochs, args.warmup_lr, args.min_lr, args.epochs, args.sched) == \
            (40, 0.0, 0.0, 300, "cosine")
        assert (args.mixup, args.cutmix, args.reprob, args.aa, args.smoothing) == (0.2, 0.0, 0.0, "original", 0.1)
        assert (args.model_ema, args.drop_path, args.drop, args.weight_decay) == (False, 0.0, 0.1, 0.05)
        assert timm.is_model(model)

"""The cascades follow timm's model conventions: pretrained files through timm's builder,
gradient checkpointing, layer-wise learning-rate decay, forward_features / forward_head."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from timm.optim import create_optimizer_v2

import models  # noqa: F401  (registers the cascades)
from models.dvt import to_original_state_dict

TINY = dict(num_classes=5, img_size=32)


def tiny(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("DVT_tiny", **{**TINY, **kwargs})


def same_weights(a: torch.nn.Module, b: torch.nn.Module, skip: str = "\0") -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa if skip not in k)


def from_file(path, **kwargs) -> torch.nn.Module:
    torch.manual_seed(1)  # other random weights than tiny()
    return timm.create_model("DVT_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                             **{**TINY, **kwargs})


@pytest.mark.parametrize("layout", ["released", "released-ddp", "ours-training", "plain"])
def test_pretrained_file_loads_through_timm(tmp_path, layout):
    model = tiny()
    state = model.state_dict()
    if layout.startswith("released"):
        original = to_original_state_dict(state)
        if layout.endswith("ddp"):
            original = {f"module.{k}": v for k, v in original.items()}
        checkpoint = {"model_state_dict": original, "flops": [np.float64(0.1), np.float32(0.2), 0.3],
                      "anytime_classification": [torch.tensor(50.0), 60.0, 70.0],
                      "dynamic_threshold": torch.rand(59, 3)}
    elif layout == "ours-training":
        checkpoint = {"model": state, "model_ema": None, "epoch": 3, "config": {"lr": 1e-3},
                      "per_rank": [{"rng": {"numpy": np.random.get_state()}}]}
    else:
        checkpoint = state
    path = tmp_path / "w.pth.tar"
    torch.save(checkpoint, path)
    loaded = from_file(path)
    assert same_weights(model, loaded)
    assert loaded.model_name == "DVT_tiny" and loaded.model_kwargs == TINY
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model.eval()(x), loaded.eval()(x)))


def test_pretrained_new_heads_for_other_classes(tmp_path):
    model = tiny()
    path = tmp_path / "w.pth.tar"
    torch.save({"model_state_dict": to_original_state_dict(model.state_dict())}, path)
    loaded = from_file(path, num_classes=3)
    assert [s.head.out_features for s in loaded.stages] == [3, 3, 3]
    assert same_weights(model, loaded, skip=".head.")
    assert not torch.equal(loaded.stages[0].head.weight[:3], model.stages[0].head.weight[:3])


def test_pretrained_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="weights are not downloaded"):
        timm.create_model("DVT_tiny", pretrained=True)
    with pytest.raises(FileNotFoundError, match="pretrained file not found"):
        from_file(tmp_path / "missing.pth.tar")
    path = tmp_path / "w.pth.tar"
    torch.save({"model_state_dict": tiny().state_dict()}, path)
    unexpected = r"does not fit DVT_tiny: unexpected keys \[\d+\]: stages\.1\.blocks\.0\.feature_reuse_mlp"
    with pytest.raises(ValueError, match=unexpected):
        from_file(path, feature_reuse=False)
    torch.save({"flops": [1.0], "epoch": 3}, path)
    with pytest.raises(ValueError, match="no model weights"):
        from_file(path)


class Payload:
    def __reduce__(self):
        return (print, ("payload ran",))


def test_pretrained_file_with_code_is_refused(tmp_path, capsys):
    path = tmp_path / "bad.pth.tar"
    torch.save({"model_state_dict": tiny().state_dict(), "x": Payload()}, path)
    with pytest.raises(RuntimeError, match="weights_only"):
        from_file(path)
    assert "payload ran" not in capsys.readouterr().out


def test_pretrained_cfg_is_complete():
    for name in ("DVT_T2t_vit_12", "DVT_Deit_small_49_196"):
        with torch.device("meta"):
            model = timm.create_model(name)
        cfg = model.pretrained_cfg
        exits = len(model.stages)
        assert cfg["architecture"] == name and cfg["url"] == "" and cfg["num_classes"] == 1000
        assert cfg["input_size"] == (3, 224, 224) and cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.875
        assert cfg["classifier"] == tuple(f"stages.{k}.head" for k in range(exits))
        assert len(cfg["first_conv"]) == exits
        for layer in cfg["first_conv"] + cfg["classifier"]:
            model.get_submodule(layer)
    assert timm.models.get_pretrained_cfg("DVT_tiny").architecture == "DVT_tiny"


@pytest.mark.parametrize("name, size", [("DVT_tiny", 32), ("DVT_T2t_vit_12", 112)])
def test_grad_checkpointing_keeps_outputs_and_gradients(name, size):
    torch.manual_seed(0)
    # random layers (dropout in blocks and T2T performers, drop path) must replay identically
    model = timm.create_model(name, num_classes=5, img_size=size, depth=2, drop_path_rate=0.2, drop_rate=0.1).train()
    x = torch.randn(2, 3, size, size)

    def step(enable: bool):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        torch.manual_seed(0)
        out = model(x)
        sum(o.square().mean() for o in out).backward()
        return [o.detach() for o in out], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    out_plain, grad_plain = step(False)
    out_ckpt, grad_ckpt = step(True)
    assert all(s.grad_checkpointing for s in model.stages)
    assert all(torch.equal(a, b) for a, b in zip(out_plain, out_ckpt))
    assert grad_plain.keys() == grad_ckpt.keys() and len(grad_plain) > 90
    for name in grad_plain:
        torch.testing.assert_close(grad_ckpt[name], grad_plain[name], rtol=0, atol=1e-6, msg=name)


def layer_scales(model: torch.nn.Module, decay: float) -> dict[str, float]:
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=decay)
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: group["lr_scale"] for group in optimizer.param_groups for p in group["params"]}


def test_layer_decay_follows_depth_within_each_stage():
    model = timm.create_model("DVT_T2t_vit_12", depth=3, num_classes=10, img_size=224)
    scales = layer_scales(model, 0.65)
    assert set(scales) == {n for n, p in model.named_parameters() if p.requires_grad}
    for k in range(3):
        assert scales[f"stages.{k}.head.weight"] == 1.0
        assert scales[f"stages.{k}.blocks.2.mlp.fc2.weight"] == pytest.approx(0.65)
        assert scales[f"stages.{k}.norm.weight"] == pytest.approx(0.65)
        assert scales[f"stages.{k}.blocks.0.attn.qkv.weight"] == pytest.approx(0.65 ** 3)
        assert scales[f"stages.{k}.tokens_to_token.project.weight"] == pytest.approx(0.65 ** 4)
        assert scales[f"stages.{k}.cls_token"] == pytest.approx(0.65 ** 4)
        depth_order = [scales[f"stages.{k}.blocks.{i}.attn.proj.weight"] for i in range(3)]
        assert depth_order == sorted(depth_order) and len(set(depth_order)) == 3
    assert scales["stages.2.blocks.1.feature_reuse_mlp.1.fc1.weight"] == scales["stages.2.blocks.1.attn.qkv.weight"]
    assert scales["stages.2.relation_reuse_conv.0.weight"] == pytest.approx(0.65 ** 4)
    assert min(scales.values()) == scales["stages.0.tokens_to_token.attention1.kqv.weight"]
    assert max(scales.values()) == 1.0


def test_forward_features_and_head():
    model = tiny().eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        assert [tuple(f.shape) for f in features] == [(3, g * g + 1, 64) for g in model.grids]
        logits = model.forward_head(features)
        assert all(torch.equal(a, b) for a, b in zip(model(x), logits))
        pooled = model.forward_head(features, pre_logits=True)
        assert [tuple(p.shape) for p in pooled] == [(3, 64)] * 3
        assert torch.equal(model.stages[1].head(pooled[1]), logits[1])
        model.reset_classifier(0)
        assert all(torch.equal(a, b) for a, b in zip(model(x), pooled))
    with pytest.raises(ValueError, match="features of 3 stages"):
        model.forward_head(features[:2])


def test_features_only_is_refused_clearly():
    """timm's features_only wraps a model by its feature_info; a cascade has none (its stages are
    separate transformers): one clear line instead of an AttributeError from timm's wrapper."""
    with pytest.raises(ValueError, match="DVT_tiny has no features_only mode .*model.forward_features"):
        timm.create_model("DVT_tiny", features_only=True)

"""Per-exit GFLOPs depend only on the model and the input size: not on the attention kernel,
the dtype, the device or the installed torch (the 224px values of the released models are
checked in test_models.py)."""
from __future__ import annotations

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import models  # noqa: F401  (registers the DVT models)
from utils.budget.flops import counting_copy, exit_gflops, stage_gmacs


def set_fused(model: torch.nn.Module, fused: bool) -> int:
    """Switch every attention of ``model`` to the fused kernel or the explicit path."""
    switched = 0
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
            switched += 1
    return switched


def tiny_without_reuse() -> torch.nn.Module:
    """Without relation reuse no stage exports its attention logits, so in eval every
    attention would take the fused kernel."""
    return timm.create_model("DVT_tiny", num_classes=10, feature_reuse=False, relation_reuse=False).eval()


def test_first_stage_matches_hand_count():
    """A plain ViT stage (7x7 patches of 32 px, 3 blocks of width 64, 2 heads, MLP 128): the
    attention's two matrix products are part of the count."""
    n, c, hidden, depth, classes = 7 * 7 + 1, 64, 128, 3, 10
    patch_embed = 7 * 7 * (3 * 32 * 32) * c
    block = n * c * 3 * c + 2 * n * n * c + n * c * c + 2 * n * c * hidden  # qkv, QK^T and AV, proj, MLP
    expected = patch_embed + depth * block + c * classes
    assert stage_gmacs(tiny_without_reuse(), img_size=224)[0] * 1e9 == pytest.approx(expected, abs=0.5)


@pytest.mark.parametrize("reuse", [False, True])
def test_fused_and_explicit_attention_count_the_same(reuse):
    """The model's own attention setting does not change the count, and the count is that of
    the explicit path run on the CPU in float32, attention products included."""
    model = timm.create_model("DVT_tiny", num_classes=10, feature_reuse=reuse, relation_reuse=reuse).eval()
    assert set_fused(model, True) > 0
    fused = exit_gflops(model, img_size=224)
    set_fused(model, False)
    explicit = exit_gflops(model, img_size=224)
    assert fused == explicit

    for stage in model.stages:  # the reference relation products: torch's counter has no formula for the fused ones
        stage.cpu_kernels = False
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, 224, 224))
    root = type(model).__name__
    by_stage = [sum(counter.get_flop_counts()[f"{root}.stages.{k}"].values()) for k in range(model.num_exits)]
    resample = [2e9 * (a - b) for a, b in zip(stage_gmacs(model, 224, include_resample=True), stage_gmacs(model, 224))]
    assert [(f - r) / 2e9 for f, r in zip(by_stage, resample)] == pytest.approx(stage_gmacs(model, 224), rel=1e-12)


def test_dtype_and_device_do_not_change_the_count():
    model = tiny_without_reuse()
    expected = exit_gflops(model, img_size=224)
    assert exit_gflops(model.to(torch.bfloat16), img_size=224) == expected
    assert exit_gflops(model.to(torch.float16), img_size=224) == expected
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert exit_gflops(model.float(), img_size=224) == expected
    assert exit_gflops(model.to("meta"), img_size=224) == expected  # tensors without data


def test_counting_leaves_the_model_alone():
    model = timm.create_model("DVT_tiny", num_classes=10).train().to(torch.bfloat16)
    set_fused(model, True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clone = counting_copy(model)
    exit_gflops(model, img_size=224)
    assert model.training and all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))
    assert all(torch.equal(before[k], v) and v.dtype == before[k].dtype for k, v in model.state_dict().items())
    assert not clone.training and all(p.dtype == torch.float32 and p.device.type == "cpu" for p in clone.parameters())
    assert {n for n, _ in clone.named_parameters()} == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("early_exit", [False, True], ids=["all exits", "early exit"])
def test_a_flop_counter_runs_over_a_loaded_model(early_exit):
    """A user's own FlopCounterMode over a cascade as the commands load it (frozen weights, which
    CPU inference packs for oneDNN): the relation reuse and the patch products give way to the
    plain operations, which the counter knows, and count as on trainable weights."""
    model = timm.create_model("DVT_tiny", num_classes=10, img_size=64).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    thresholds = torch.tensor([2.0, 2.0, -1e8])  # every image runs every stage

    def count() -> int:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.forward_early_exit(x, thresholds) if early_exit else model(x)
        return counter.get_total_flops()

    trainable = count()
    model.requires_grad_(False)
    with torch.no_grad():
        model(x)  # the packed weights made, as a first evaluation makes them
    assert count() == trainable > 0

"""The models compute what the original implementation computes, load its checkpoints,
count its FLOPs, train, and run in any precision."""
from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from golden import GOLDEN_DIR, VARIANTS, golden_input, golden_state_dict, load_expected, load_manifest
from helpers import midway, spread_cascade, spread_thresholds
from models.dvt import to_original_state_dict
from utils.budget.flops import exit_gflops
from utils.checkpoint.files import atomic_save, load_checkpoint_file
from utils.checkpoint.weights import build_from_checkpoint, load_checkpoint, load_weights
from utils.errors import CheckpointError

ALL_MODELS = ["DVT_T2t_vit_12", "DVT_T2t_vit_14", "DVT_Deit_small", "DVT_Deit_small_49_196",
              "DVT_Vit_base_49_196", "DVT_tiny"]


def golden_model(variant: str, salt: str = "A") -> torch.nn.Module:
    name, feature_reuse, relation_reuse = VARIANTS[variant]
    model = timm.create_model(name, feature_reuse=feature_reuse, relation_reuse=relation_reuse)
    model.load_state_dict(golden_state_dict(load_manifest(variant), salt), strict=True)
    return model.eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_golden_logits_match_original(variant):
    model = golden_model(variant)
    with torch.no_grad():
        logits = torch.stack(model(golden_input(1, 3))).numpy()  # (exits, B, classes)
    expected = load_expected()[variant]
    assert logits.shape == expected.shape
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)


@pytest.mark.skipif(not (GOLDEN_DIR / "expected_B.npz").exists(), reason="no second golden set")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_golden_logits_other_weights_and_batch(variant):
    """Another salt, seed and batch size, computed by the original code."""
    model = golden_model(variant, salt="B")
    expected = load_expected("expected_B.npz")[variant]
    with torch.no_grad():
        logits = torch.stack(model(golden_input(2, expected.shape[1]))).numpy()
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)


def test_sample_independent_of_batch():
    """Each sample's logits depend on that sample alone, whatever the batch size."""
    model = golden_model("DVT_Deit_small")
    x = golden_input(5, 4)
    with torch.no_grad():
        together = torch.stack(model(x))
        alone = torch.cat([torch.stack(model(x[i:i + 1])) for i in range(4)], dim=1)
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_model_builds_and_runs(name):
    num_exits = 2 if name.endswith("_49_196") else 3
    with torch.device("meta"):  # shapes only: the big ones stay cheap
        model = timm.create_model(name, num_classes=7)
        out = model(torch.empty(2, 3, 224, 224))
    assert isinstance(out, tuple) and len(out) == num_exits
    assert all(o.shape == (2, 7) for o in out)
    assert model.grids == ((7, 10, 14) if num_exits == 3 else (7, 14))


def test_factory_kwargs_are_honoured():
    model = timm.create_model("DVT_tiny", num_classes=5, feature_reuse=False, relation_reuse=True,
                              drop_path_rate=0.2, img_size=64)
    assert model.num_classes == 5 and model.img_size == 64
    assert not any("feature_reuse_mlp" in k for k in model.state_dict())
    assert any("relation_reuse_conv" in k for k in model.state_dict())
    assert model.stages[2].blocks[-1].drop_path.drop_prob == pytest.approx(0.2)
    out = model(torch.randn(2, 3, 64, 64))
    assert [o.shape for o in out] == [(2, 5)] * 3
    with pytest.raises(ValueError, match="weights are not downloaded"):
        timm.create_model("DVT_tiny", pretrained=True)
    with pytest.raises(TypeError):
        timm.create_model("DVT_tiny", no_such_option=1)


def test_state_dict_layouts_round_trip():
    """Our layout, the original layout and a DDP ('module.') prefix all load strictly, and
    exporting gives back exactly the original keys, shapes and order."""
    manifest = load_manifest("DVT_T2t_vit_12")
    original = golden_state_dict(manifest, "A")
    model = golden_model("DVT_T2t_vit_12")
    exported = to_original_state_dict(model.state_dict())
    assert [(k, tuple(v.shape)) for k, v in exported.items()] == manifest
    assert all(torch.equal(exported[k], original[k]) for k in original)

    fresh = timm.create_model("DVT_T2t_vit_12")
    fresh.load_state_dict({f"module.{k}": v for k, v in original.items()}, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    fresh = timm.create_model("DVT_T2t_vit_12")
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


@pytest.fixture(scope="module")
def deit_weights():
    return golden_state_dict(load_manifest("DVT_Deit_small"), "A")


def test_mismatched_keys_are_named(deit_weights):
    model = timm.create_model("DVT_Deit_small")
    broken = dict(deit_weights)
    del broken["less_token.blocks.3.attn.qkv.weight"]
    broken["normal_token.blocks.0.extra.weight"] = torch.zeros(1)
    broken["less_less_token.head.weight"] = torch.zeros(10, 384)
    with pytest.raises(CheckpointError) as err:
        load_weights(model, broken)
    msg = str(err.value)
    assert "missing keys [1]: stages.1.blocks.3.attn.qkv.weight" in msg
    assert "unexpected keys [1]: stages.2.blocks.0.extra.weight" in msg
    assert "mis-shaped keys [1]: stages.0.head.weight (checkpoint (10, 384), model (1000, 384))" in msg
    with pytest.raises(RuntimeError, match="Missing key"):  # plain strict loading fails too
        model.load_state_dict(broken)


def test_checkpoint_for_another_model_is_recognised():
    t2t = golden_state_dict(load_manifest("DVT_T2t_vit_12-nf-nr"), "A")
    with pytest.raises(CheckpointError, match=r"looks like a checkpoint for DVT_T2t_vit_12 \(feature_reuse=False"):
        load_weights(timm.create_model("DVT_T2t_vit_12"), t2t)


def test_a_single_exit_models_weights_are_named_with_the_option_that_evaluates_them():
    """timm's own ViT weights given for a cascade: the error says what they are and how to run them."""
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10).state_dict()
    with pytest.raises(CheckpointError, match=r"These are a single-exit model's weights \(timm's layout: blocks\.\*, "
                                              r"no stages\.\*\): evaluate it as a one-exit baseline with --model and "
                                              r"its timm name, e\.g\. vit_tiny_patch16_224\.$"):
        load_weights(timm.create_model("DVT_tiny", num_classes=10), vit)


@pytest.mark.parametrize("name", [None, "DVT_T2t_vit_12"])
def test_an_ablations_released_weights_build_their_variant_under_its_name(name):
    """A released file of an ablation (the original layout, no model name, a reuse path off) is
    built as that variant, also when the command names the model (``inference.py --model
    DVT_T2t_vit_12``, as the README's command does): that was refused as not fitting."""
    weights = golden_state_dict(load_manifest("DVT_T2t_vit_12-nf-nr"), "A")
    model, _ = build_from_checkpoint({"model_state_dict": weights}, "ablation.pth.tar", name=name)
    assert [(s.feature_reuse, s.relation_reuse) for s in model.stages] == [(False, False)] * 3
    with pytest.raises(CheckpointError, match=r"is a checkpoint for DVT_T2t_vit_12|looks like a checkpoint for "
                                              r"DVT_T2t_vit_12 \(feature_reuse=False"):
        build_from_checkpoint({"model_state_dict": weights}, "ablation.pth.tar", name="DVT_T2t_vit_14")


@pytest.mark.parametrize("wrap", ["model_state_dict", "state_dict", "model", None])
def test_released_checkpoint_file_loads(tmp_path, deit_weights, wrap):
    results = {
        "flops": [np.float64(1.15), np.float32(3.66), 8.84],
        "anytime_classification": [torch.tensor(72.7), 79.0, np.float64(81.8)],
        "dynamic_threshold": torch.rand(59, 3),
        "budgeted_batch_classification": [[1.0, 2.0], [70.0, 80.0]],
    }
    ckpt = {f"module.{k}": v for k, v in deit_weights.items()} if wrap is None else {wrap: deit_weights, **results}
    path = tmp_path / "ckpt.pth.tar"
    torch.save(ckpt, path)
    model = timm.create_model("DVT_Deit_small")
    loaded = load_checkpoint(model, path)
    assert torch.equal(model.stages[2].head.weight, deit_weights["normal_token.head.weight"])
    if wrap is not None:
        assert float(loaded["flops"][0]) == pytest.approx(1.15)


class _Exploit:
    def __reduce__(self):
        return (print, ("this ran while loading",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth.tar"
    with open(path, "wb") as f:
        torch.save({"model_state_dict": {}, "payload": _Exploit()}, f)
    with pytest.raises(CheckpointError, match="not a safe checkpoint"):
        load_checkpoint_file(path)
    assert "this ran" not in capsys.readouterr().out
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(CheckpointError):
        load_checkpoint_file(raw)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint_file(tmp_path / "missing.pth.tar")


def test_atomic_save_round_trip(tmp_path):
    path = tmp_path / "sub" / "x.pth.tar"
    atomic_save({"a": torch.arange(3)}, path)
    assert torch.equal(load_checkpoint_file(path)["a"], torch.arange(3))
    assert [p.name for p in path.parent.iterdir()] == ["x.pth.tar"]


PUBLISHED_GFLOPS = {
    "DVT_T2t_vit_12": [0.47, 1.46, 3.50],
    "DVT_T2t_vit_14": [1.21, 3.84, 9.33],
    "DVT_Deit_small": [1.15, 3.66, 8.84],
}


# What utils.budget.flops counts, the same on every device, dtype, attention kernel and torch version.
COUNTED_GFLOPS = {
    "DVT_T2t_vit_12": [0.468, 1.446, 3.455],
    "DVT_T2t_vit_14": [1.201, 3.818, 9.264],
    "DVT_Deit_small": [1.143, 3.643, 8.801],
}


@pytest.mark.parametrize("name", list(PUBLISHED_GFLOPS))
def test_exit_gflops_match_published(name):
    gflops = exit_gflops(timm.create_model(name), img_size=224)
    np.testing.assert_allclose(gflops, PUBLISHED_GFLOPS[name], rtol=0.02)
    assert [round(g, 3) for g in gflops] == COUNTED_GFLOPS[name]


def small_t2t(**kwargs):
    """A T2T cascade with the real geometry and Performer but two blocks per stage."""
    return timm.create_model("DVT_T2t_vit_12", depth=2, num_classes=10, **kwargs)


@pytest.mark.parametrize("build", [small_t2t, lambda: timm.create_model("DVT_tiny", num_classes=10)])
def test_every_trainable_parameter_gets_a_gradient(build):
    """All but one module learn from the summed loss. The exception is structural (the
    original has it too): the last block of the last stage feeds only its class token to
    the head, and the reused features are zero at the class token, so that block's
    feature-reuse MLP gets an exactly zero gradient."""
    torch.manual_seed(0)
    model = build().train()
    logits = model(torch.randn(2, 3, 224, 224))
    loss = sum(F.cross_entropy(out, torch.tensor([1, 2])) for out in logits)
    loss.backward()
    dead = {f"stages.{model.num_exits - 1}.blocks.{len(model.stages[-1].blocks) - 1}.feature_reuse_mlp.{n}"
            for n, _ in model.stages[-1].blocks[-1].feature_reuse_mlp.named_parameters()}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert dead <= trainable.keys()
    no_grad = [n for n, p in trainable.items() if n not in dead and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not no_grad
    assert all(trainable[n].grad is not None and not trainable[n].grad.any() for n in dead)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert all(n.endswith(".w") or n.endswith("pos_embed") for n in frozen)  # performer features, sinusoids


def test_fused_and_manual_attention_agree():
    torch.manual_seed(0)
    model = small_t2t().eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        fused = model(x)
        for m in model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
        manual = model(x)
    for a, b in zip(fused, manual):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunk", [2, 64])
def test_relation_reuse_batched_and_per_sample_agree(chunk):
    """The CPU default (one sample at a time, written into one output), uneven chunks, and
    the accelerator default (whole batch)."""
    torch.manual_seed(0)
    model = small_t2t().eval()
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        per_sample = model(x)
        for stage in model.stages:
            stage.relation_chunk = chunk
        batched = model(x)
    for a, b in zip(per_sample, batched):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("src,dst", [(7, 10), (10, 14), (14, 7), (4, 6), (3, 3)])
def test_sparse_relation_resampling_equals_the_dense_product(src, dst):
    """The query axis resampled as weighted sums of rows gives the dense product's values."""
    from models.layers import GridResample
    g = GridResample(src, dst)
    n = src * src + 1
    if (src, dst) in ((7, 10), (10, 14)):
        assert g.row_index.shape[1] == 4  # two source cells per axis
    x = torch.randn(2, 3, n, n, generator=torch.Generator().manual_seed(0))
    dense = g(x, relations=True)
    sparse = g(x, relations=True, bags=g.relation_bags(6, x.dtype))
    assert sparse.shape == dense.shape == (2, 3, dst * dst + 1, dst * dst + 1)
    torch.testing.assert_close(sparse, dense, rtol=0, atol=1e-6)
    half = g(x.bfloat16(), relations=True, bags=g.relation_bags(6, torch.bfloat16))
    torch.testing.assert_close(half.float(), dense, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("src,dst", [(7, 10), (10, 14), (14, 7), (4, 6), (3, 3)])
def test_sparse_token_resampling_equals_the_dense_products(src, dst):
    """Token maps resampled as weighted sums of source tokens give the two dense products'
    values, every sample of the batch from its own tokens."""
    from models.layers import GridResample
    g = GridResample(src, dst)
    x = torch.randn(3, src * src, 5, generator=torch.Generator().manual_seed(0))
    dense = g(x)
    sparse = g(x, bags=g.token_bags(3, x.dtype))
    assert sparse.shape == dense.shape == (3, dst * dst, 5)
    torch.testing.assert_close(sparse, dense, rtol=0, atol=1e-6)
    torch.testing.assert_close(g(x[1:2], bags=g.token_bags(1, x.dtype)), dense[1:2], rtol=0, atol=1e-6)
    half = g(x.bfloat16(), bags=g.token_bags(3, torch.bfloat16))
    torch.testing.assert_close(half.float(), dense, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype, frozen", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False),
                                          (torch.bfloat16, True)])
def test_cpu_relation_kernels_equal_the_reference_products(dtype, frozen):
    """CPU inference (positions as rows of fused products, their weights packed when frozen
    where this CPU packs the dtype, sparse resampling, default and uneven chunks) answers as the reference products
    (``cpu_kernels = False``)."""
    import models.layers as layers
    torch.manual_seed(0)
    model = small_t2t().eval().to(dtype).requires_grad_(not frozen)
    x = torch.randn(3, 3, 224, 224).to(dtype)
    with torch.no_grad():
        fast = model(x)
        conv = model.stages[2].relation_reuse_conv
        packs = frozen and layers.packing_works(dtype)
        assert all((c.weight in layers._PACKED) == packs for c in (conv[0], conv[2]))
        for stage in model.stages:
            stage.relation_chunk = 2
        chunked = model(x)
        for stage in model.stages:
            stage.cpu_kernels, stage.relation_chunk = False, None
        reference = model(x)
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=0.1)
    for a, b, c in zip(fast, chunked, reference):
        torch.testing.assert_close(a.float(), c.float(), **tol)
        torch.testing.assert_close(b.float(), c.float(), **tol)
    assert fast[-1].float().std() > 0.1  # not an answer that any path would give


@pytest.mark.parametrize("dtype, capability", [(torch.float32, "AVX512"), (torch.float32, "AVX2"),
                                               (torch.bfloat16, "AVX512")])
def test_inference_linear_without_the_fused_kernel(monkeypatch, dtype, capability):
    """The fused oneDNN product and the plain linear (+ exact GELU) it stands for agree, with the
    GELU fused into the product (AVX-512) or run after it (AVX2 code, float32)."""
    import models.layers as layers
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=gen).to(dtype) for shape in ((37, 24), (40, 24), (40,)))
    fused = [layers.inference_linear(x, w, b, gelu=g) for g in (False, True)]
    monkeypatch.setattr(layers, "fused_linear_works", lambda dtype: False)
    plain = [layers.inference_linear(x, w, b, gelu=g) for g in (False, True)]
    torch.testing.assert_close(plain[0], F.linear(x, w, b))
    torch.testing.assert_close(plain[1], F.gelu(F.linear(x, w, b)))
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=5e-2)
    for a, c in zip(fused, plain):
        torch.testing.assert_close(a.float(), c.float(), **tol)


def test_bfloat16_blocks_fuse_their_linears_only_where_nothing_else_changes(monkeypatch):
    """bfloat16 CPU inference runs a block's linear layers as fused products (same answer as the
    plain layers); a hooked layer, float32 with AVX2 code and gradients keep the plain call."""
    import models.layers as layers
    torch.manual_seed(0)
    block = layers.Block(64, 2, qkv_bias=True).eval().bfloat16()
    x = torch.randn(3, 17, 64).bfloat16()
    calls = []
    real = layers.inference_linear
    monkeypatch.setattr(layers, "inference_linear", lambda *a, **k: calls.append(k.get("gelu", False)) or real(*a, **k))
    works = layers.fused_linear_works(torch.bfloat16)  # no bf16 kernel in oneDNN without AVX-512
    with torch.no_grad():
        fused = block(x)[0]
        assert sorted(calls) == ([False, False, False, True] if works else [])  # qkv, proj, fc2; fc1 + GELU
        calls.clear()
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
        block.float()(x.float())
        assert not calls
        block.bfloat16()
    seen = []
    handle = block.attn.qkv.register_forward_hook(lambda *a: seen.append(1))
    with torch.no_grad():
        block(x)
    handle.remove()
    assert seen == [1] and sorted(calls) == ([False, False, True] if works else [])
    calls.clear()
    plain = block(x)[0]  # gradients on
    assert not calls
    torch.testing.assert_close(fused.float(), plain.float(), rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("capability, frozen, batch, min_weight, fused", [
    ("AVX512", True, 2, None, True), ("AVX512", True, 15, None, True), ("AVX512", False, 2, None, False),
    ("AVX2", True, 2, 64 * 64, True), ("AVX2", True, 15, 64 * 64, False), ("AVX2", True, 2, None, False),
    ("AVX2", False, 2, 64 * 64, False), ("DEFAULT", True, 2, 64 * 64, False)])
def test_float32_blocks_fuse_their_linears_where_packed_products_win(monkeypatch, capability, frozen, batch,
                                                                     min_weight, fused):
    """float32 CPU inference runs a block's linear layers as oneDNN products on packed weights
    only for frozen weights, where torch runs AVX-512 code, or AVX2 code on at most
    ``AVX2_PACKED_MAX_ROWS`` rows (2 x 9 tokens: yes; 15 x 9: no) and weights of at least
    ``AVX2_PACKED_MIN_WEIGHT`` values (this block's 4k-16k: only with the bound lowered); the
    answer is the plain one."""
    import models.layers as layers
    if not (layers.fused_linear_works(torch.float32) and layers.packing_works()):
        pytest.skip("torch without oneDNN's fused linear or its weight packing")
    assert 2 * 9 <= layers.AVX2_PACKED_MAX_ROWS < 15 * 9 and layers.AVX2_PACKED_MIN_WEIGHT > 64 * 256
    if min_weight is not None:
        monkeypatch.setattr(layers, "AVX2_PACKED_MIN_WEIGHT", min_weight)
    torch.manual_seed(0)
    block = layers.Block(64, 2, qkv_bias=True).eval()
    x = torch.randn(batch, 9, 64)
    plain = block(x)[0].detach()  # gradients on: the plain layers
    block.requires_grad_(not frozen)
    calls = []
    real = layers.inference_linear
    monkeypatch.setattr(layers, "inference_linear", lambda *a, **k: calls.append(k.get("gelu", False)) or real(*a, **k))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    with torch.no_grad():
        out = block(x)[0]
    assert sorted(calls) == ([False, False, False, True] if fused else [])
    assert (block.mlp.fc1.weight in layers._PACKED) == fused
    torch.testing.assert_close(out, plain, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_weights_follow_their_parameters(dtype):
    """Only frozen weights are packed, float32 and (where this CPU packs it) bfloat16 ones. A
    packed weight gives the plain product, and is made again when its parameter changes in
    place, gets other storage (a dtype round trip, which may reuse the freed address) or is
    stepped by an optimizer (a fused one moves no version counter); it lives outside the
    module (deepcopy works) and goes with the parameter."""
    import copy
    import gc

    import models.layers as layers
    if not layers.packing_works(dtype):
        pytest.skip(f"torch or this CPU without oneDNN's fused linear or its weight packing in {dtype}")
    torch.manual_seed(0)
    lin, x = torch.nn.Linear(24, 40).to(dtype), torch.randn(5, 24, dtype=dtype)
    run = lambda m: layers.inference_linear(x, m.weight, m.bias)  # noqa: E731
    # float32: the plain product's rounding; bfloat16: far below what a stale weight would differ by
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=2e-2)
    other = torch.bfloat16 if dtype == torch.float32 else torch.float32
    with torch.no_grad():
        torch.testing.assert_close(run(lin), lin(x), **tol)
        assert lin.weight not in layers._PACKED  # trainable: never packed
    lin.requires_grad_(False)
    with torch.no_grad():
        torch.testing.assert_close(run(lin), lin(x), **tol)
        first = layers._PACKED[lin.weight][2]
        assert run(lin) is not None and layers._PACKED[lin.weight][2] is first  # made once
        lin.load_state_dict({"weight": torch.randn(40, 24), "bias": lin.bias})
        torch.testing.assert_close(run(lin), lin(x), **tol)
        for _ in range(3):  # a round trip through the other dtype: other storage, maybe the same address
            lin.to(other).to(dtype)  # float32: other numbers (rounded to bfloat16)
            torch.testing.assert_close(run(lin), lin(x), **tol)
        lin.weight.data = torch.randn(40, 24, dtype=dtype)
        torch.testing.assert_close(run(lin), lin(x), **tol)
    # Unfrozen, trained by a fused optimizer (which leaves the version counter as it was), frozen again.
    lin.requires_grad_(True)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.5, fused=True)
    lin(x).square().sum().backward()
    opt.step()
    lin.requires_grad_(False)
    with torch.no_grad():
        torch.testing.assert_close(run(lin), lin(x), **tol)
    twin = copy.deepcopy(lin)
    assert twin.weight not in layers._PACKED and torch.equal(twin.weight, lin.weight)
    before = len(layers._PACKED)
    del lin, twin, opt
    gc.collect()
    assert len(layers._PACKED) == before - 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_linear_is_counted_by_a_flop_counter(dtype):
    """Under a dispatch mode (a FLOP counter) the fused product gives way to the plain one, so
    every product is counted, whoever calls it (the relation-reuse products call it directly)."""
    from torch.utils.flop_counter import FlopCounterMode

    import models.layers as layers
    x, w, b = torch.randn(7, 24).to(dtype), torch.nn.Parameter(torch.randn(40, 24).to(dtype), requires_grad=False), None
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        y = layers.inference_linear(x, w, b, gelu=True)
    assert counter.get_total_flops() == 2 * 7 * 24 * 40
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(y.float(), F.gelu(F.linear(x, w)).float(), rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_that_keeps_no_logits_writes_the_probabilities_over_them(dtype):
    """Without ``return_logits`` CPU inference computes the softmax in place: a consumed bias
    ends up holding the attention probabilities, and the tokens are those of the path that
    keeps the logits."""
    import models.layers as layers
    torch.manual_seed(0)
    attn = layers.Attention(64, 2, qkv_bias=True).eval().to(dtype)
    attn.fused_attn = False
    x, bias = torch.randn(3, 17, 64).to(dtype), torch.randn(3, 2, 17, 17).to(dtype)
    with torch.no_grad():
        kept, logits = attn(x, bias=bias.clone(), return_logits=True, consume_bias=True)
        buffer = bias.clone()
        out, none = attn(x, bias=buffer, consume_bias=True)
    assert none is None
    torch.testing.assert_close(out, kept, rtol=0, atol=0)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(buffer.float(), logits.float().softmax(-1), rtol=0, atol=tol)
    with torch.enable_grad():  # gradients on: the plain softmax, the bias left as it was
        kept_bias = bias.clone()
        attn(x, bias=kept_bias, consume_bias=True)
    assert torch.equal(kept_bias, bias)


@pytest.mark.parametrize("name", ["DVT_tiny", "DVT_T2t_vit_12"])
def test_inference_relation_biases_equal_the_training_path(name):
    """Eager inference builds each block's relation bias when the block runs and accumulates the
    attention products onto it; with gradients on, every bias is built at once and added. Same
    outputs, and the gradients still flow."""
    torch.manual_seed(0)
    kwargs = dict(depth=2) if name != "DVT_tiny" else {}
    model = timm.create_model(name, img_size=64 if name == "DVT_tiny" else 224, **kwargs).eval()
    x = torch.randn(3, 3, model.img_size, model.img_size)
    with torch.no_grad():
        inference = model(x)
        biases = model.stages[2]._relation_biases(list(model.iter_stages(x))[1].relations)
    assert type(biases).__name__ == "BlockBiases" and len(biases) == model.stages[2].depth
    with pytest.raises(IndexError):
        biases[len(biases)]
    training = model(x)
    assert training[-1].requires_grad
    for a, b in zip(inference, training):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_feature_reuse_folds_frozen_weights_once_and_again_when_they_change(dtype):
    """Eager inference maps the previous stage's tokens for every block at once, with the blocks'
    MLPs folded: the same features as block by block. Frozen weights are folded once and kept;
    a change to any block's parameters (not only the first one's; in place, loaded, or stepped
    by a fused optimizer) folds them again; trainable weights are folded on every call and never kept."""
    import models.dvt as dvt
    torch.manual_seed(0)
    model = timm.create_model("DVT_Deit_small", depth=3).eval().to(dtype)
    stage, x = model.stages[1], torch.randn(2, 3, 224, 224)
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=3e-2)

    def check() -> None:
        with torch.no_grad():
            tokens = list(model.iter_stages(x, num_exits=1))[0].tokens
            per_block = torch.cat([stage._reused_features(b, tokens) for b in stage.blocks], dim=-1)
            torch.testing.assert_close(stage._all_reused_features(tokens), per_block, **tol)

    first = stage.blocks[0].feature_reuse_mlp[0].weight
    check()
    assert first not in dvt._FOLDED_REUSE  # trainable: folded per call
    model.requires_grad_(False)
    check()
    kept = dvt._FOLDED_REUSE[first][2]
    check()
    assert dvt._FOLDED_REUSE[first][2] is kept  # folded once
    last = stage.blocks[-1].feature_reuse_mlp
    with torch.no_grad():
        last[1].fc2.bias.add_(1.0)  # in place, the last block's: folded again
    check()
    last.load_state_dict({k: 0.02 * torch.randn_like(v) for k, v in last.state_dict().items()})
    check()
    assert dvt._FOLDED_REUSE[first][2] is not kept
    # trained by a fused optimizer (which moves no version counter), frozen again: folded again
    kept = dvt._FOLDED_REUSE[first][2]
    last.requires_grad_(True)
    opt = torch.optim.AdamW(last.parameters(), lr=0.02, fused=True)
    last(torch.randn(4, 384, dtype=dtype)).float().square().sum().backward()
    opt.step()
    last.requires_grad_(False)
    check()
    assert dvt._FOLDED_REUSE[first][2] is not kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_accumulates_onto_a_bias_only_when_it_may(dtype):
    """consume_bias: without gradients the logits are written over the bias (same result as
    adding it); with gradients, or without consume_bias, the caller's bias is left alone."""
    from models.layers import Attention
    torch.manual_seed(0)
    attn = Attention(64, 2, qkv_bias=True).eval().to(dtype)
    x = torch.randn(2, 50, 64).to(dtype)
    bias = torch.randn(2, 2, 50, 50).to(dtype)
    with torch.no_grad():
        ref, ref_logits = attn(x, bias=bias.clone(), return_logits=True)
        kept = bias.clone()
        attn(x, bias=kept, return_logits=True)
        assert torch.equal(kept, bias)  # not consumed: untouched
        consumed = bias.clone()
        out, logits = attn(x, bias=consumed, return_logits=True, consume_bias=True)
        assert logits.data_ptr() == consumed.data_ptr()  # the bias became the logits' buffer
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=2e-2)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(logits, ref_logits, **tol)
    grad_bias = bias.clone().requires_grad_()
    y, _ = attn(x, bias=grad_bias, consume_bias=True)
    y.float().sum().backward()
    assert torch.equal(grad_bias.detach(), bias) and grad_bias.grad is not None


@pytest.mark.parametrize("shape", [(1, 3, 224, 200), (1, 3, 256, 256), (1, 1, 224, 224), (3, 224, 224)])
def test_images_of_another_size_are_refused_clearly(shape):
    model = timm.create_model("DVT_T2t_vit_12", depth=1, num_classes=5).eval()
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"expected images of shape \(batch, 3, 224, 224\).*img_size=224"):
            model(torch.zeros(shape))
        with pytest.raises(ValueError, match="expected images of shape"):
            model.forward_early_exit(torch.zeros(shape), [0.5, 0.5, 0.0])


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_raw_pixels_are_refused_clearly(dtype):
    """Integer images (raw 0-255 pixels, as torchvision.io.read_image gives them) would be cast to
    the model's dtype and classified without their scaling and normalisation: refused instead."""
    model = timm.create_model("DVT_tiny", num_classes=5, img_size=32).eval()
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=dtype)
    with torch.no_grad():
        for run in (lambda: model(pixels), lambda: model.forward_early_exit(pixels, [0.5, 0.5, 0.0])):
            with pytest.raises(TypeError, match=f"expected floating-point images, scaled to 0-1 .*got {dtype}"):
                run()
        model(pixels.double())  # other floating types are cast, as a bf16 model takes float32 images


def recording(steps, calls: list):
    """``steps`` that record (stage, samples) at each call."""
    return [lambda x, *carry, k=k, step=step: calls.append((k, x.shape[0])) or step(x, *carry)
            for k, step in enumerate(steps)]


@pytest.mark.parametrize("queue", [None, 2])
def test_queued_early_exit_answers_each_batch_as_forward_early_exit(queue):
    """One result per input batch, in order, equal to forward_early_exit on that batch alone;
    stage 1 runs on each batch as it comes, the later stages on exactly ``queue`` samples
    (default: the batch size) gathered across batches, and only the end of the stream runs
    them on fewer."""
    x = torch.randn(23, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = spread_cascade()
    thresholds = spread_thresholds(model, x)
    batches, calls = x.split(5), []
    outs = list(model.queued_early_exit(batches, thresholds, queue=queue, steps=recording(model.exit_steps(), calls)))
    assert [o.logits.shape for o in outs] == [(len(b), 5) for b in batches]
    with torch.no_grad():
        for got, xb in zip(outs, batches):
            want = model.forward_early_exit(xb, thresholds)
            assert torch.equal(got.exit_index, want.exit_index)
            torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-5)
            torch.testing.assert_close(got.confidence, want.confidence, rtol=0, atol=1e-6)
    exits = torch.cat([o.exit_index for o in outs])
    assert set(exits.tolist()) == {0, 1, 2}
    assert [n for k, n in calls if k == 0] == [len(b) for b in batches]
    for k in (1, 2):
        sizes = [n for stage, n in calls if stage == k]
        assert sizes[:-1] == [queue or 5] * (len(sizes) - 1) and 1 <= sizes[-1] <= (queue or 5)
        assert sum(sizes) == int((exits >= k).sum())


REUSE_CASES = {"both": {}, "features": dict(relation_reuse=False), "relations": dict(feature_reuse=False),
               "none": dict(feature_reuse=False, relation_reuse=False)}


@pytest.mark.parametrize("reuse", list(REUSE_CASES))
def test_early_exit_finishes_a_stage_s_last_block_only_for_the_samples_that_go_on(reuse):
    """An exit reads its class token alone: early exit runs each stage's last block for that
    token (its MLP sees one row per sample), and for the other tokens only for the samples that
    go on, in the next stage's step, when that stage reuses features or relations; the answers
    are forward's."""
    import models

    torch.manual_seed(0)
    model = models.build_dvt("DVT_tiny", img_size=32, depth=2, num_classes=5, **REUSE_CASES[reuse]).eval()
    with torch.no_grad():
        for stage in model.stages:
            stage.head.weight.mul_(30.0)
    rows = {k: [] for k in range(3)}
    for k, stage in enumerate(model.stages):
        stage.blocks[-1].mlp.fc1.register_forward_pre_hook(lambda m, args, k=k: rows[k].append(args[0].shape[:2]))
    x = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = torch.stack(model(x))
        conf = logits.softmax(-1).amax(-1)
        for seen in rows.values():
            seen.clear()  # forward's rows
        thresholds = torch.tensor([midway(conf[0]), -1e8, -1e8])  # about half leave at exit 1, the rest at 2
        out = model.forward_early_exit(x, thresholds)
    left = int((out.exit_index == 0).sum())
    assert 0 < left < 12 and out.exit_index.max() == 1
    tokens = model.stages[0].num_tokens
    finished = [(12 - left, tokens)] if reuse != "none" else []
    assert rows == {0: [(12, 1)] + finished, 1: [(12 - left, 1)], 2: []}
    want = logits.gather(0, out.exit_index.view(1, -1, 1).expand(1, -1, 5))[0]
    torch.testing.assert_close(out.logits, want, rtol=0, atol=1e-5)


def test_queued_early_exit_gathers_the_waiting_samples_into_buffers_kept_for_the_stream():
    """Each later stage runs on the same memory every time, its full runs and the end of the
    stream alike (no fresh allocation per batch), with batches larger than the queue."""
    x = torch.randn(23, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = spread_cascade()
    thresholds = spread_thresholds(model, x)
    seen = []
    steps = [lambda xb, *carry, k=k, step=step: seen.append((k, xb.shape[0], xb.data_ptr(), carry[0].data_ptr()
                                                             if carry else 0)) or step(xb, *carry)
             for k, step in enumerate(model.exit_steps())]
    outs = list(model.queued_early_exit(x.split(7), thresholds, queue=3, steps=steps))
    with torch.no_grad():
        want = model.forward_early_exit(x, thresholds)
    assert torch.equal(torch.cat([o.exit_index for o in outs]), want.exit_index)
    for k in (1, 2):
        calls = [c for c in seen if c[0] == k]
        assert len(calls) >= 3 and {c[2:] for c in calls} == {calls[0][2:]}


def test_queued_early_exit_answers_as_soon_as_a_batch_is_done():
    """Batches whose samples all leave at the first exit are answered before the next batch
    is read; an empty stream gives nothing; bad thresholds and queues are refused."""
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = spread_cascade()
    thresholds = spread_thresholds(model, x)
    read = []

    def batches():
        for i, xb in enumerate(x.split(2)):
            read.append(i)
            yield xb

    stream = model.queued_early_exit(batches(), [-1e8, -1e8, -1e8])
    for i, out in enumerate(stream):
        assert read[-1] == i and out.exit_index.tolist() == [0, 0]
    assert list(model.queued_early_exit([], thresholds)) == []
    with pytest.raises(ValueError, match="expected 3 thresholds"):
        list(model.queued_early_exit(x.split(2), [0.5, 0.5]))
    with pytest.raises(ValueError, match="queue must be at least 1"):
        list(model.queued_early_exit(x.split(2), thresholds, queue=0))


def test_early_exit_stream_hands_batches_in_and_answers_as_queued_early_exit():
    """push() answers the batches complete so far, in order, close() the rest: together the
    results of queued_early_exit over the same batches; images are checked on push, a closed
    stream refuses more, a stream closed before any batch answers nothing, flush() answers every
    batch pushed so far and keeps the stream open, and an empty first batch leaves the queue to
    the next one."""
    x = torch.randn(17, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = spread_cascade()
    thresholds = spread_thresholds(model, x)
    want = list(model.queued_early_exit(x.split(4), thresholds))
    stream = model.early_exit_stream(thresholds)
    per_push = [stream.push(xb) for xb in x.split(4)]
    assert not torch.is_grad_enabled() or all(not o.logits.requires_grad for outs in per_push for o in outs)
    got = [o for outs in per_push for o in outs] + stream.close()
    assert len(got) == len(want) == 5 and sum(map(len, per_push)) < 5  # some came only with later batches
    for g, w in zip(got, want):
        assert torch.equal(g.exit_index, w.exit_index) and torch.equal(g.logits, w.logits)
    with pytest.raises(RuntimeError, match="closed"):
        stream.push(x[:4])
    with pytest.raises(ValueError, match="expected images of shape"):
        model.early_exit_stream(thresholds).push(torch.zeros(2, 3, 16, 16))
    assert model.early_exit_stream(thresholds).close() == []
    stream = model.early_exit_stream(thresholds)  # flush: whatever waits runs now, the stream stays open
    assert stream.push(x[:4]) == []  # some of its images wait for stage 2
    first = stream.flush()
    assert len(first) == 1 and torch.equal(first[0].exit_index, want[0].exit_index)
    assert len(stream.push(x[4:8]) + stream.close()) == 1
    stream = model.early_exit_stream(thresholds)  # an empty batch first: answered at once, no queue of 0
    empty = stream.push(x[:0])
    assert [o.logits.shape for o in empty] == [(0, 5)]
    got = [o for xb in x.split(4) for o in stream.push(xb)] + stream.close()
    assert stream.queue == 4 and all(torch.equal(g.exit_index, w.exit_index) for g, w in zip(got, want))


def test_relation_reuse_in_chunks_trains():
    """A chunk size set for training gives the gradients of the whole batch."""
    torch.manual_seed(0)
    model = small_t2t().eval()  # no dropout: both runs see the same function
    x = torch.randn(3, 3, 224, 224)
    grads = []
    for chunk in (None, 2):
        for stage in model.stages:
            stage.relation_chunk = chunk
        model.zero_grad()
        sum(out.sum() for out in model(x)).backward()
        grads.append(model.stages[2].relation_reuse_conv[0].weight.grad.clone())
    assert grads[0].abs().max() > 1e-3
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_soft_splits_are_the_unfolds(dtype):
    """The strided-view soft splits hold exactly nn.Unfold's values: the image split in its
    order, the token-map split in (row, column, channel) order."""
    from models.dvt import image_patches, token_patches
    from models.layers import channels_last_order
    torch.manual_seed(0)
    images = torch.randn(2, 3, 224, 224).to(dtype)
    for kernel, stride, padding in ((7, 4, 2), (11, 6, 5), (14, 8, 3)):
        ref = F.unfold(images, kernel, padding=padding, stride=stride).transpose(1, 2)
        assert torch.equal(image_patches(images, kernel, stride, padding), ref)
    for grid in (56, 38, 28, 19, 14, 7):
        tokens = torch.randn(2, grid * grid, 64).to(dtype)
        ref = F.unfold(tokens.transpose(1, 2).reshape(2, 64, grid, grid), 3, padding=1, stride=2).transpose(1, 2)
        perm = channels_last_order(64, 9, tokens.device)
        assert torch.equal(token_patches(tokens, grid, 3, 2, 1), ref[..., perm])


@pytest.mark.parametrize("frozen", [False, True])
def test_patch_embedding_as_a_product_equals_the_convolution(monkeypatch, frozen):
    """CPU inference embeds non-overlapping patches by one matrix product (frozen weights packed
    on AVX-512): the convolution's tokens for each released geometry and for one that leaves
    rows and columns out; with gradients, under autocast's bf16 and where the flag is off, the
    values agree too, and the convolution itself runs where gradients are on."""
    from models.dvt import PatchEmbed
    torch.manual_seed(0)
    x = torch.randn(3, 3, 224, 224)
    for geometry in ((32, 32, 0), (23, 23, 3), (16, 16, 0), (15, 15, 1)):
        embed = PatchEmbed(geometry, 3, 64).eval().requires_grad_(not frozen)
        with torch.no_grad():
            want = embed(x)
            assert want.shape == (3, ((224 + 2 * geometry[2]) // geometry[0]) ** 2, 64)
            torch.testing.assert_close(embed(x, as_product=True), want, rtol=0, atol=2e-5)
            assert embed(x[:0], as_product=True).shape == (0,) + want.shape[1:]  # an empty batch
            with torch.autocast("cpu", dtype=torch.bfloat16):
                torch.testing.assert_close(embed(x, as_product=True).float(), want, rtol=0, atol=0.1)
    calls = []
    monkeypatch.setattr(PatchEmbed, "_patch_product", lambda self, x: calls.append(1))
    embed = PatchEmbed((16, 16, 0), 3, 64).requires_grad_(True)
    embed(x, as_product=True).sum().backward()  # training: the convolution
    assert embed.proj.weight.grad is not None and not calls
    with torch.no_grad():
        embed(x)  # the flag off: the convolution
        assert not calls
        embed(x, as_product=True)
        assert calls == [1]
        handle = embed.proj.register_forward_hook(lambda *args: None)  # a hook on the convolution is kept
        embed(x, as_product=True)
        assert calls == [1]
        handle.remove()
        overlapping = PatchEmbed((16, 8, 0), 3, 64)
        assert overlapping(x, as_product=True).shape == (3, 27 * 27, 64) and calls == [1]


@pytest.mark.parametrize("frozen", [False, True])
def test_t2t_embedding_matches_the_unfold_formulation(frozen):
    """The T2T embedding with permuted weights gives what unfold -> Performer -> unfold ->
    Performer -> unfold -> linear gives with the parameters as stored. Frozen weights are
    permuted once and kept, and permuted again when they change; trainable ones per call."""
    import models.layers as layers
    torch.manual_seed(0)
    embed = small_t2t().stages[1].tokens_to_token.eval().requires_grad_(not frozen)
    x = torch.randn(2, 3, 224, 224)

    def reference():
        g0, g1, _ = embed.grids
        y = embed.attention1(embed.soft_split0(x).transpose(1, 2))
        y = embed.attention2(embed.soft_split1(y.transpose(1, 2).reshape(2, -1, g0, g0)).transpose(1, 2))
        return embed.project(embed.soft_split2(y.transpose(1, 2).reshape(2, -1, g1, g1)).transpose(1, 2))

    kept = (embed.project.weight, embed.attention2.kqv.weight, embed.attention2.norm1.weight,
            embed.attention2.norm1.bias)
    with torch.no_grad():
        torch.testing.assert_close(embed(x), reference(), rtol=0, atol=2e-5)
        assert all((w in layers._REORDERED) == frozen for w in kept)
        if frozen:
            first = layers._REORDERED[embed.project.weight][2]
            embed(x)
            assert layers._REORDERED[embed.project.weight][2] is first  # made once
        for w in kept:  # an in-place change: the kept copies are made again
            w.add_(0.05 * torch.randn(w.shape))
        torch.testing.assert_close(embed(x), reference(), rtol=0, atol=2e-5)


def test_frozen_t2t_gives_input_gradients_after_an_inference_mode_pass():
    """The reordered weights a frozen T2T model keeps (made here under ``torch.inference_mode``)
    can be saved for backward: a later pass with gradients on the input works, and gives the
    gradient of a model that never ran in inference mode."""
    torch.manual_seed(0)
    model = small_t2t().eval().requires_grad_(False)
    fresh = copy.deepcopy(model)
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        model(x)
    grads = []
    for m in (model, fresh):
        xg = x.clone().requires_grad_(True)
        m(xg)[-1].sum().backward()
        grads.append(xg.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-6)


def test_t2t_embedding_in_chunks_equals_the_whole_batch():
    """CPU inference embeds a few images per call; training takes the whole batch; the
    results agree either way."""
    import models.dvt as dvt
    torch.manual_seed(0)
    stage = small_t2t().stages[2].eval()
    x = torch.randn(5, 3, 224, 224)
    per_image = stage.tokens_to_token.grids[0] ** 2 * 192 * 4  # 56 x 56 tokens, kqv width 3 x 64, float32
    assert stage._embed_chunk(x) == 5  # gradients on: whole batch
    with torch.no_grad():
        assert stage._embed_chunk(x) == dvt.T2T_CHUNK_BYTES // per_image
        whole = stage.tokens_to_token(x)
        stage.embed_chunk = 2
        torch.testing.assert_close(stage.embed(x), whole, rtol=0, atol=1e-5)


def test_attention_takes_the_faster_path_on_the_cpu(monkeypatch):
    """Explicit products in half precision and for short sequences, the fused kernel in
    float32 from CPU_FUSED_MIN_TOKENS tokens on; fused_attn = False always goes explicit."""
    from models import layers
    calls = []
    fused = F.scaled_dot_product_attention
    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or fused(*a, **k))
    attn = layers.Attention(64, 2).eval()
    with torch.no_grad():
        for tokens, dtype, expect in ((50, torch.float32, 0), (layers.CPU_FUSED_MIN_TOKENS, torch.float32, 1),
                                      (197, torch.bfloat16, 0), (197, torch.float16, 0)):
            calls.clear()
            out, _ = attn.to(dtype)(torch.randn(2, tokens, 64).to(dtype))
            assert len(calls) == expect and out.dtype == dtype, (tokens, dtype)
        attn.float().fused_attn = False
        calls.clear()
        attn(torch.randn(2, 197, 64))
        assert not calls


def test_bf16_autocast_close_to_float32():
    """bfloat16 autocast on CPU: logits of the golden DeiT cascade stay within 0.1 of float32
    (standard deviation of the logits: about 1)."""
    model = golden_model("DVT_Deit_small")
    x = golden_input(1, 2)
    with torch.no_grad():
        ref = torch.stack(model(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = torch.stack(model(x))
    assert low.dtype == torch.bfloat16
    err = (low.float() - ref).abs().max().item()
    assert err < 0.1, err
    assert (low.float().argmax(-1) == ref.argmax(-1)).float().mean() >= 0.5


def test_cpu_products_of_a_frozen_model_follow_bf16_autocast(monkeypatch):
    """A frozen model (as loaded for inference) under CPU bfloat16 autocast: every fused oneDNN
    product takes bfloat16 operands, as autocast gives F.linear (they have no autocast rule of
    their own: before, the blocks ran float32 products, about 3x slower than autocast's), with
    results close to the plain layers'; the weights' bfloat16 copies are made once and made again
    when the weights change, and trainable weights are cast per call."""
    import models.layers as layers
    from models import build_dvt

    torch.manual_seed(0)
    model = build_dvt("DVT_tiny", img_size=32, num_classes=3).eval().requires_grad_(False)
    x = torch.randn(3, 3, 32, 32)
    works = layers.fused_linear_works(torch.bfloat16), layers.fused_linear_works(torch.float32)  # probed first
    operands = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise",
                        lambda a, w, *rest: operands.append((a.dtype, w.dtype)) or real(a, w, *rest))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused = torch.stack(model(x)).float()
        monkeypatch.undo()
        with torch.enable_grad():  # gradients on: the plain layers, cast by autocast itself
            plain = torch.stack(model(x)).float()
    assert set(operands) <= {(torch.bfloat16, torch.bfloat16)}
    assert bool(operands) == works[0]
    torch.testing.assert_close(fused, plain, rtol=0, atol=0.05)

    lin = torch.nn.Linear(8, 16).requires_grad_(False)
    first = layers.autocast_weight(lin.weight, torch.bfloat16)
    assert first.dtype == torch.bfloat16 and layers.autocast_weight(lin.weight, torch.bfloat16) is first
    with torch.no_grad():
        lin.weight.mul_(2)
    again = layers.autocast_weight(lin.weight, torch.bfloat16)
    assert again is not first and torch.equal(again, lin.weight.bfloat16())
    lin.requires_grad_(True)
    assert layers.autocast_weight(lin.weight, torch.bfloat16) is not layers.autocast_weight(lin.weight, torch.bfloat16)


def test_bf16_autocast_products_read_their_weights_cast_and_packed_once():
    """Under CPU bfloat16 autocast the fused product of a frozen float32 layer reads its weight
    cast to bfloat16 and packed for oneDNN, made once and made again when the weight changes;
    the answer is that of the unpacked cast weight."""
    import models.layers as layers
    if not layers.packing_works(torch.bfloat16):
        pytest.skip("torch or this CPU without oneDNN's bfloat16 fused linear or its weight packing")
    torch.manual_seed(0)
    lin, x = torch.nn.Linear(24, 40).requires_grad_(False), torch.randn(5, 24)
    unpacked = lambda: torch.ops.mkldnn._linear_pointwise(  # noqa: E731
        x.bfloat16(), lin.weight.bfloat16(), lin.bias.bfloat16(), "none", [], "")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layers.inference_linear(x, lin.weight, lin.bias)
        first = layers._CAST_PACKED[lin.weight][2]
        torch.testing.assert_close(out, unpacked(), rtol=0, atol=1e-2)
        layers.inference_linear(x, lin.weight, lin.bias)
        assert layers._CAST_PACKED[lin.weight][2] is first  # made once
        lin.weight.mul_(-2)
        torch.testing.assert_close(layers.inference_linear(x, lin.weight, lin.bias), unpacked(), rtol=0, atol=1e-2)
        assert layers._CAST_PACKED[lin.weight][2] is not first
    assert layers.autocast_weight(lin.weight, torch.bfloat16).layout == torch.strided  # unpacked unless asked


@pytest.mark.parametrize("build", [lambda: small_t2t(), lambda: timm.create_model("DVT_tiny", num_classes=10)])
def test_frozen_bf16_models_run_packed_weights_with_the_same_answers(monkeypatch, build):
    """A frozen bfloat16 model (``model.to(torch.bfloat16)``) reads its linear layers' and
    convolutions' weights packed for oneDNN where this CPU packs bfloat16 (stages up to 14% faster
    at one image on 2 AVX-512 cores without AMX), and answers as with the weights unpacked."""
    import models.layers as layers
    if not layers.packing_works(torch.bfloat16):
        pytest.skip("torch or this CPU without oneDNN's bfloat16 fused linear or its weight packing")
    torch.manual_seed(0)
    model = build().eval().requires_grad_(False).to(torch.bfloat16)
    x = torch.randn(2, 3, 224, 224) if model.img_size == 224 else torch.randn(2, 3, model.img_size, model.img_size)
    with torch.no_grad():
        packed = torch.stack(model(x)).float()
        blocks = [b for stage in model.stages for b in stage.blocks]
        assert all(layer.weight in layers._PACKED for b in blocks
                   for layer in (b.attn.qkv, b.attn.proj, b.mlp.fc1, b.mlp.fc2))
        monkeypatch.setattr(layers, "packs", lambda weight: False)
        unpacked = torch.stack(model(x)).float()
    torch.testing.assert_close(packed, unpacked, rtol=0, atol=1e-2)
    assert packed.std() > 0.1


@pytest.mark.parametrize("variant", ["DVT_Deit_small", "DVT_T2t_vit_12"])
def test_bf16_weights_close_to_float32(variant):
    """A model converted once to bfloat16 (``model.to(torch.bfloat16)``, no autocast) takes
    float32 images, computes in bfloat16 with the Performer's random features in float32, and
    stays within 0.1 of the float32 logits of the golden weights."""
    model = golden_model(variant)
    x = golden_input(1, 2)
    with torch.no_grad():
        ref = torch.stack(model(x))
        low = torch.stack(model.to(torch.bfloat16)(x))
        exits = model.forward_early_exit(x, thresholds=torch.tensor([2.0, 2.0, -1e8]))
    assert low.dtype == torch.bfloat16
    err = (low.float() - ref).abs().max().item()
    assert err < 0.1, err
    # early exit runs the last block for the class token alone: other products, same bound
    assert exits.logits.dtype == torch.bfloat16 and exits.exit_index.eq(2).all()
    err = (exits.logits.float() - ref[-1]).abs().max().item()
    assert err < 0.1, err


def test_performer_stays_float32_under_autocast():
    from models.layers import TokenPerformer

    perf = TokenPerformer(27, 16)
    seen = []
    perf._features = (lambda f: (lambda x: seen.append(x.dtype) or f(x)))(perf._features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = perf(torch.randn(2, 5, 27))
    assert seen == [torch.float32, torch.float32] and y.isfinite().all()

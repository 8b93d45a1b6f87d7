"""Compiled and exported cascades: one graph per stage for every batch size, no graph breaks,
the eager results, and real early exit from exported stage programs."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import inference
import main as train_main
import models
from fake_data import make_image_folder
from helpers import TINY, spread_cascade, spread_thresholds
from models.deploy import CompiledCascade, FrozenWeights, compile_model, export_stages, load_stages, save_stages
from models.dvt import run_early_exit, to_original_state_dict

IMG = 32


@pytest.mark.slow
def test_compiled_stages_one_graph_each_and_eager_results():
    """torch.compile (graph capture checked with the eager backend, which compiles nothing):
    the all-exit forward is one graph for batches 4, 3 and 6; each early-exit stage is one
    graph, without breaks, whatever number of samples reaches it; results equal eager."""
    torch._dynamo.reset()
    counters.clear()
    model = spread_cascade(img_size=IMG)
    cascade = CompiledCascade(model, backend="eager")
    with torch.no_grad():
        for b in (4, 3, 6):
            x = torch.randn(b, 3, IMG, IMG)
            for got, want in zip(cascade(x), model(x)):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
        assert counters["stats"]["unique_graphs"] == 1
        x = torch.randn(12, 3, IMG, IMG)
        thresholds = spread_thresholds(model, x)
        for xs in (x, x[:9]):
            got, want = cascade.forward_early_exit(xs, thresholds), model.forward_early_exit(xs, thresholds)
            assert torch.equal(got.exit_index, want.exit_index)
            torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-4)
        assert set(got.exit_index.tolist()) == {0, 1, 2}
    assert counters["stats"]["unique_graphs"] == 1 + model.num_exits
    assert not counters["graph_break"]


def test_compiled_t2t_cascade_embeds_eagerly_on_the_cpu(monkeypatch):
    """A T2T cascade compiled on the CPU: each stage's tokens-to-token embedding runs eagerly on
    every call, outside the graphs (faster than inductor's code for it), and the rest is still
    one graph for the all-exit forward and one per stage, for every batch size, without breaks;
    the eager results, all exits and real early exit."""
    from models.dvt import T2TEmbed
    torch._dynamo.reset()
    counters.clear()
    model = spread_cascade("DVT_T2t_vit_12", img_size=224, embed_dim=32, num_heads=2, seed=1)
    calls = {"eager": 0, "traced": 0}
    forward = T2TEmbed.forward

    def counted(self, x):
        calls["traced" if torch.compiler.is_compiling() else "eager"] += 1
        return forward(self, x)

    monkeypatch.setattr(T2TEmbed, "forward", counted)
    cascade = CompiledCascade(model, backend="eager")
    with torch.no_grad():
        for b in (4, 3):
            x = torch.randn(b, 3, 224, 224)
            for got, want in zip(cascade(x), model(x)):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
        assert calls == {"eager": 2 * 2 * model.num_exits, "traced": 0}  # compiled and eager, both batches
        assert counters["stats"]["unique_graphs"] == 1
        x = torch.randn(12, 3, 224, 224)
        thresholds = spread_thresholds(model, x)
        got, want = cascade.forward_early_exit(x, thresholds), model.forward_early_exit(x, thresholds)
        assert torch.equal(got.exit_index, want.exit_index) and set(got.exit_index.tolist()) == {0, 1, 2}
        torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-4)
    assert calls["traced"] == 0
    assert counters["stats"]["unique_graphs"] == 1 + model.num_exits
    assert not counters["graph_break"]
    with pytest.raises(ValueError, match=r"from_tokens takes the patch tokens of every stage \(3, "):
        model.from_tokens(*model.embed_images(x)[:2])


@pytest.mark.parametrize("name, img_size", [("DVT_tiny", IMG), ("DVT_T2t_vit_12", 224)])
def test_jit_trace_captures_the_plain_operations(name, img_size):
    """``torch.jit.trace`` (and so the legacy ONNX exporter) of a cascade in CPU inference: the
    eager-only paths (writes over inputs, oneDNN's own operators, chunk loops) step aside, the
    trace records plain operators and gives the eager logits."""
    torch.manual_seed(0)
    model = models.build_dvt(name, img_size=img_size, depth=1, num_classes=5).eval()
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        want = model(x)
        traced = torch.jit.trace(model, x, check_trace=False)
        got = traced(x)
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert not [k for k in kinds if k.startswith("mkldnn::")] and "aten::linear" in kinds
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_exported_stages_run_early_exit(tmp_path):
    """torch.export of every stage with a dynamic batch, saved and loaded back: real early
    exit from the programs alone gives the eager model's exits and logits, at any batch size."""
    model = spread_cascade(img_size=IMG, seed=1)
    x = torch.randn(10, 3, IMG, IMG)
    thresholds = spread_thresholds(model, x)
    paths = save_stages(export_stages(model, x[:2]), tmp_path)
    assert [p.name for p in paths] == ["stage0.pt2", "stage1.pt2", "stage2.pt2"]
    steps = load_stages(tmp_path)
    with torch.no_grad():
        for xs in (x, x[:1], x[3:8]):
            got, want = run_early_exit(steps, xs, thresholds), model.forward_early_exit(xs, thresholds)
            assert torch.equal(got.exit_index, want.exit_index)
            torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-4)
            torch.testing.assert_close(got.confidence, want.confidence, rtol=0, atol=1e-5)
    with pytest.raises(FileNotFoundError):
        load_stages(tmp_path / "nothing")


@pytest.mark.slow
def test_inductor_compiled_cascade_matches_eager():
    """The default backend (inductor): all exits and real early exit within 1e-4 of eager."""
    torch._dynamo.reset()
    model = spread_cascade(img_size=IMG, seed=2)
    cascade = CompiledCascade(model)
    x = torch.randn(8, 3, IMG, IMG)
    thresholds = spread_thresholds(model, x)
    with torch.no_grad():
        for xs in (x, x[:5]):
            for got, want in zip(cascade(xs), model(xs)):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
            got, want = cascade.forward_early_exit(xs, thresholds), model.forward_early_exit(xs, thresholds)
            assert torch.equal(got.exit_index, want.exit_index)
            torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_frozen_graphs_hold_the_weights_and_refuse_changed_ones():
    """``freeze=True`` (inductor's freezing, what inference.py --compile runs): the eager results
    within 1e-4; the graphs answer with the weights of their first call (their check bypassed,
    a changed weight changes nothing), so a changed model is refused."""
    torch._dynamo.reset()
    model = spread_cascade(img_size=IMG, seed=4).requires_grad_(False)
    cascade = CompiledCascade(model, freeze=True)
    x = torch.randn(6, 3, IMG, IMG)
    thresholds = spread_thresholds(model, x)
    with torch.no_grad():
        for got, want in zip(cascade(x), model(x)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
        got, want = cascade.forward_early_exit(x, thresholds), model.forward_early_exit(x, thresholds)
        assert torch.equal(got.exit_index, want.exit_index)
        torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-4)
        before = cascade(x)[-1]
        model.stages[-1].head.bias.add_(1.0)  # every logit of the last exit moves by 1 in eager
        with pytest.raises(RuntimeError, match="weights changed after its graphs were compiled with freeze=True"):
            cascade(x)
        with pytest.raises(RuntimeError, match="compile the model again"):
            cascade.forward_early_exit(x, thresholds)
        cascade._forward.frozen.seen = None  # the check bypassed: the graph still holds the old bias
        torch.testing.assert_close(cascade(x)[-1], before, rtol=0, atol=0)
        torch.testing.assert_close(model(x)[-1], before + 1, rtol=0, atol=1e-4)


def test_frozen_weights_check_sees_every_change():
    """What the check of frozen graphs' weights sees: nothing when the model is unchanged;
    ``load_state_dict``, an in-place write, ``module.to(dtype)`` and an optimizer step (fused
    ones move no version counter) each raise. freeze=True takes inductor alone."""
    def changes(change) -> bool:
        torch.manual_seed(0)
        module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
        frozen = FrozenWeights(module)
        frozen.check()
        frozen.check()
        change(module)
        try:
            frozen.check()
        except RuntimeError:
            return True
        return False

    other = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)).state_dict()
    assert not changes(lambda m: m(torch.randn(2, 4)))
    assert not changes(lambda m: m.eval().requires_grad_(False))
    assert changes(lambda m: m.load_state_dict(other))
    with torch.no_grad():
        assert changes(lambda m: m[1].weight.mul_(2))
    assert changes(lambda m: m.to(torch.float64))

    def step(m):
        opt = torch.optim.SGD(m.parameters(), lr=0.0)  # lr 0: the values stay, the step still counts
        m(torch.randn(2, 4)).sum().backward()
        opt.step()
    assert changes(step)
    with torch.inference_mode():  # weights made under inference mode count no versions
        module = torch.nn.Linear(4, 3)
    frozen = FrozenWeights(module)
    frozen.check()
    frozen.check()
    module.to(torch.float64)
    with pytest.raises(RuntimeError, match="weights changed"):
        frozen.check()
    with pytest.raises(ValueError, match="freeze=True is inductor's freezing; backend 'eager' has none"):
        compile_model(torch.nn.Linear(2, 2), freeze=True, backend="eager")


@pytest.mark.slow
def test_compile_flags_train_and_evaluate(tmp_path, capsys):
    """main.py --compile trains (checkpoint keys unchanged); inference.py --compile --early_exit
    gives the simulated exits."""
    data = make_image_folder(tmp_path / "data", num_classes=3, train_per_class=4, val_per_class=4)
    args = [str(data), "--config", TINY, "--device", "cpu", "--output",
            str(tmp_path / "out"), "--experiment", "c", "--epochs", "1", "--no-release", "--compile"]
    assert train_main.main(args) == 0
    last = torch.load(tmp_path / "out" / "train" / "c" / "last.pth.tar", map_location="cpu", weights_only=False)
    assert not any("_orig_mod" in k for k in last["model"])
    ckpt = tmp_path / "tiny.pth.tar"
    torch.manual_seed(3)
    tiny = models.build_dvt("DVT_tiny", img_size=IMG, num_classes=3)
    torch.save({"model_state_dict": to_original_state_dict(tiny.state_dict())}, ckpt)
    code = inference.main(["--data_url", f"{data}/", "--checkpoint_path", str(ckpt), "--eval_mode", "2",
                           "--model", "DVT_tiny", "--img_size", str(IMG),
                           "--batch_size", "4", "--workers", "0", "--device", "cpu", "--calib_size", "6",
                           "--calib_transform", "eval", "--early_exit", "--budget_index", "20", "--compile",
                           "--no_progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "12/12 exits and 12/12 predictions as simulated" in out

"""Budgeted batch classification: golden reproduction and a per-sample loop reference."""
from __future__ import annotations

import math

import pytest
import torch

from golden import load_budget_fixture, synthetic_exit_probs
from helpers import midway
from utils import dynamic_evaluate, dynamic_find_threshold
from utils.budget import thresholds
from utils.budget.stats import ExitStatsAccumulator, anytime_accuracy, exit_stats
from utils.budget.thresholds import (
    DEFAULT_BUDGETS,
    budget_curve,
    budget_exit_shares,
    evaluate_thresholds,
    exit_assignment,
    find_thresholds,
    thresholds_for_budget,
)

# ------------------------------------------------------------------ loop reference
# A plain per-sample reading of the original algorithm, independent of utils.budget.

def loop_thresholds(confidence: torch.Tensor, shares: torch.Tensor) -> list[float]:
    num_exits, n = confidence.shape
    conf = confidence.tolist()
    has_left = [False] * n
    thresholds = [1e8] * num_exits
    for k in range(num_exits - 1):
        wanted = math.floor(n * shares[k])  # float32 tensor product, as in the original
        seen = 0
        for i in sorted(range(n), key=lambda j: -conf[k][j]):
            if not has_left[i]:
                seen += 1
                if seen == wanted:
                    thresholds[k] = conf[k][i]
                    break
        for i in range(n):
            if conf[k][i] >= thresholds[k]:
                has_left[i] = True
    thresholds[-1] = -1e8
    return thresholds


def loop_exits(confidence: torch.Tensor, thresholds) -> list[int]:
    num_exits, n = confidence.shape
    conf = confidence.tolist()
    exits = []
    for i in range(n):
        k = 0
        while k < num_exits and not conf[k][i] >= float(thresholds[k]):
            k += 1
        exits.append(k)
    return exits


def loop_evaluate(confidence, correct, flops, thresholds) -> tuple[float, float]:
    num_exits, n = confidence.shape
    right = correct.tolist()
    hits = 0
    leavers = torch.zeros(num_exits)  # float32 counts, as in the original
    for i, k in enumerate(loop_exits(confidence, thresholds)):
        if k < num_exits:
            hits += int(right[k][i])
            leavers[k] += 1
    expected = 0
    for k in range(num_exits):
        expected = expected + leavers[k] / n * flops[k]
    return hits * 100.0 / n, float(expected)


def random_stats(seed: int, num_exits: int, n: int, levels: int | None = None):
    """Random (confidence, correct); ``levels`` quantises the confidences to force ties."""
    gen = torch.Generator().manual_seed(seed)
    confidence = torch.rand(num_exits, n, generator=gen)
    if levels is not None:
        confidence = torch.floor(confidence * levels) / levels
    correct = torch.rand(num_exits, n, generator=gen) < confidence
    return confidence, correct


def shares_table(num_exits: int) -> torch.Tensor:
    return torch.stack([budget_exit_shares(p, num_exits) for p in DEFAULT_BUDGETS])  # (59, E)


# ------------------------------------------------------------------------ golden

@pytest.fixture(scope="module")
def golden_case():
    fixture = load_budget_fixture()
    probs, targets = synthetic_exit_probs(fixture["seed"], fixture["n"], fixture["classes"])
    return fixture, probs, targets


def test_reproduces_original_curve(golden_case):
    fixture, probs, targets = golden_case
    confidence, correct = exit_stats(probs, targets)
    thresholds, (gflops, top1) = budget_curve(confidence, correct, fixture["flops"], calib_conf=confidence)
    assert thresholds.shape == (59, 3) and thresholds.dtype == torch.float32
    assert thresholds.tolist() == fixture["thresholds"]  # exact
    expected_gflops, expected_top1 = fixture["budgeted_batch_classification"]
    assert gflops == pytest.approx(expected_gflops, abs=1e-6, rel=0)
    assert top1 == pytest.approx(expected_top1, abs=1e-6, rel=0)
    assert anytime_accuracy(correct) == pytest.approx(fixture["anytime_classification"], abs=1e-4, rel=0)


def test_original_signatures(golden_case):
    fixture, probs, targets = golden_case
    expected_gflops, expected_top1 = fixture["budgeted_batch_classification"]
    for p in (1, 20, 59):
        shares = budget_exit_shares(p, 3)
        thresholds = dynamic_find_threshold(probs, targets, shares)
        assert thresholds.tolist() == fixture["thresholds"][p - 1]
        top1, gflops = dynamic_evaluate(probs, targets, fixture["flops"], thresholds)
        assert top1 == pytest.approx(expected_top1[p - 1], abs=1e-6, rel=0)
        assert gflops == pytest.approx(expected_gflops[p - 1], abs=1e-6, rel=0)


def test_original_signatures_per_budget_loop_is_exact_and_sees_changes(golden_case):
    """Called once per budget on the same tensors (the original calling pattern): every budget
    matches the batched curve; an in-place change or a new tensor is never served stale."""
    fixture, probs, targets = golden_case
    calib, val = probs.clone(), probs.flip(1).clone()  # two sets, as in eval mode 2
    val_targets = targets.flip(0).clone()

    def per_budget() -> tuple[list, list, list]:
        rows, gflops, top1 = [], [], []
        for p in DEFAULT_BUDGETS:
            thresholds = dynamic_find_threshold(calib, targets, budget_exit_shares(p, 3))
            acc, cost = dynamic_evaluate(val, val_targets, fixture["flops"], thresholds)
            rows.append(thresholds.tolist()), gflops.append(cost), top1.append(acc)
        return rows, gflops, top1

    def fresh() -> tuple[list, list, list]:
        val_conf, val_correct = exit_stats(val, val_targets)
        calib_conf, _ = exit_stats(calib, targets)
        thresholds, (gflops, top1) = budget_curve(val_conf, val_correct, fixture["flops"], calib_conf=calib_conf)
        return thresholds.tolist(), gflops, top1

    before = per_budget()
    assert before == fresh()
    calib[:, : len(targets) // 2] *= 0.75  # in place: new confidences for the search
    val_targets[::3] = (val_targets[::3] + 1) % probs.shape[-1]  # and new correctness
    after = per_budget()
    assert after == fresh()
    assert after[0] != before[0] and after[2] != before[2]
    with torch.inference_mode():  # no version counter: reduced on every call
        calib, val = calib.clone(), val.clone()
        first = per_budget()
        calib.mul_(0.5)
        assert per_budget() == fresh() != first


def test_stored_thresholds_mode_matches_search(golden_case):
    fixture, probs, targets = golden_case
    confidence, correct = exit_stats(probs, targets)
    stored = torch.tensor(fixture["thresholds"], dtype=torch.float32)
    thresholds, curve = budget_curve(confidence, correct, fixture["flops"], thresholds=stored)
    assert torch.equal(thresholds, stored)
    assert curve == budget_curve(confidence, correct, fixture["flops"], calib_conf=confidence)[1]
    with pytest.raises(ValueError, match="exactly one"):
        budget_curve(confidence, correct, fixture["flops"])
    with pytest.raises(ValueError, match="exactly one"):
        budget_curve(confidence, correct, fixture["flops"], calib_conf=confidence, thresholds=stored)


def test_budget_exit_shares():
    shares = budget_exit_shares(20, 3)  # ratio 1: equal shares
    assert shares.dtype == torch.float32 and shares.shape == (3,)
    assert torch.allclose(shares, torch.full((3,), 1 / 3))
    assert len(DEFAULT_BUDGETS) == 59
    low, high = budget_exit_shares(1, 2), budget_exit_shares(59, 2)
    assert low[0] > low[1] and high[0] < high[1]
    with pytest.raises(ValueError):
        budget_exit_shares(0, 3)


# --------------------------------------------------------------- loop reference

@pytest.mark.parametrize(
    "seed, num_exits, n, levels",
    [(0, 3, 300, None), (1, 3, 300, 12), (2, 2, 257, None), (3, 2, 200, 5), (4, 4, 150, 8)],
)
def test_matches_loop_reference(seed, num_exits, n, levels):
    confidence, correct = random_stats(seed, num_exits, n, levels)
    flops = [0.5 * (k + 1) + 0.13 for k in range(num_exits)]
    shares = shares_table(num_exits)
    thresholds = find_thresholds(confidence, shares)  # batched (59, E)
    _, (gflops, top1) = budget_curve(confidence, correct, flops, calib_conf=confidence)
    for row, p in enumerate(DEFAULT_BUDGETS):
        if row % 3 and levels is None:
            continue  # every third budget suffices without ties; all of them with ties
        expected = loop_thresholds(confidence, shares[row])
        assert thresholds[row].tolist() == expected
        assert find_thresholds(confidence, shares[row]).tolist() == expected
        assert exit_assignment(confidence, thresholds[row]).tolist() == loop_exits(confidence, expected)
        ref_top1, ref_gflops = loop_evaluate(confidence, correct, flops, thresholds[row])
        assert evaluate_thresholds(confidence, correct, flops, thresholds[row]) == (ref_top1, ref_gflops)
        assert (top1[row], gflops[row]) == (ref_top1, ref_gflops)


def test_ties_leave_together():
    # five samples share the top confidence; a share of two still lets all five leave
    confidence = torch.tensor([[0.9] * 5 + [0.1] * 5, [0.5] * 10, [0.3] * 10])
    thresholds = find_thresholds(confidence, torch.tensor([0.2, 0.3, 0.5]))
    assert thresholds[0] == pytest.approx(0.9)
    assert exit_assignment(confidence, thresholds).tolist() == [0] * 5 + [1] * 5
    assert thresholds.tolist() == loop_thresholds(confidence, torch.tensor([0.2, 0.3, 0.5]))


def test_zero_count_keeps_exit_closed():
    confidence, correct = random_stats(5, 3, 5)
    shares = budget_exit_shares(59, 3)  # floor(5 * 0.079) = 0 samples for the first exit
    assert math.floor(5 * shares[0]) == 0
    thresholds = find_thresholds(confidence, shares)
    assert thresholds[0].item() == 1e8
    assert thresholds.tolist() == loop_thresholds(confidence, shares)
    assert (exit_assignment(confidence, thresholds) > 0).all()


def test_too_few_left_keeps_exit_closed():
    confidence, _ = random_stats(6, 4, 10)
    shares = torch.tensor([0.7, 0.5, 0.2, 0.1])  # 7 leave first, 5 wanted of the 3 left
    thresholds = find_thresholds(confidence, shares)
    assert thresholds[1].item() == 1e8
    assert thresholds.tolist() == loop_thresholds(confidence, shares)
    # everyone leaves at the first exit: nobody is left for the others
    everyone = torch.tensor([[0.5] * 10, [0.4] * 10, [0.3] * 10, [0.2] * 10])
    thresholds = find_thresholds(everyone, torch.tensor([0.1, 0.3, 0.3, 0.3]))
    assert thresholds.tolist() == [0.5, 1e8, 1e8, -1e8]


def test_sample_passing_no_threshold():
    confidence, correct = random_stats(7, 3, 50)
    thresholds = torch.tensor([0.9, 0.8, 0.7])  # last exit not open to everyone
    exits = exit_assignment(confidence, thresholds)
    assert exits.tolist() == loop_exits(confidence, thresholds)
    assert (exits == 3).any()
    assert evaluate_thresholds(confidence, correct, [1.0, 2.0, 3.0], thresholds) == loop_evaluate(
        confidence, correct, [1.0, 2.0, 3.0], thresholds)


def test_budget_chunks_agree(monkeypatch):
    confidence, _ = random_stats(8, 3, 400, levels=30)
    shares = shares_table(3)
    whole = find_thresholds(confidence, shares)
    monkeypatch.setattr(thresholds, "_MAX_WORK_ELEMENTS", 1000)  # 2 budgets per chunk
    assert torch.equal(find_thresholds(confidence, shares), whole)


# ------------------------------------------------------------------- statistics

def test_accumulator_matches_one_shot():
    gen = torch.Generator().manual_seed(0)
    num_exits, n, classes = 3, 70, 11
    logits = torch.randn(num_exits, n, classes, generator=gen) * 3
    targets = torch.randint(0, classes, (n,), generator=gen)
    accumulator = ExitStatsAccumulator()
    for start, stop in ((0, 32), (32, 64), (64, 70)):
        accumulator.update([logits[k, start:stop] for k in range(num_exits)], targets[start:stop])
    confidence, correct = accumulator.result()
    expected_conf, expected_correct = exit_stats(torch.softmax(logits, dim=-1), targets)
    assert confidence.shape == correct.shape == (num_exits, n)
    assert confidence.dtype == torch.float32 and correct.dtype == torch.bool
    assert torch.equal(confidence, expected_conf) and torch.equal(correct, expected_correct)
    assert torch.equal(correct, logits.argmax(dim=-1) == targets)
    # only the (exits, N) summaries are kept: 4 bytes of confidence + 1 byte of correctness
    assert accumulator.num_samples == n
    assert accumulator.nbytes() == num_exits * n * 5
    assert all(t.shape[0] == num_exits and t.dim() == 2 for t in accumulator._confidence + accumulator._correct)


def test_accumulator_low_precision_logits():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 8, 5, generator=gen).to(torch.bfloat16)
    targets = torch.randint(0, 5, (8,), generator=gen)
    accumulator = ExitStatsAccumulator()
    accumulator.update(logits, targets)  # a stacked (E, B, C) tensor works too
    confidence, _ = accumulator.result()
    assert confidence.dtype == torch.float32
    assert torch.equal(confidence, torch.softmax(logits.float(), dim=-1).amax(dim=-1))
    with pytest.raises(ValueError, match="exits"):
        accumulator.update(torch.randn(3, 8, 5), targets)
    with pytest.raises(ValueError, match="no batch"):
        ExitStatsAccumulator().result()


# ----------------------------------------------------------- thresholds for a budget

def test_thresholds_for_budget(golden_case):
    fixture, probs, targets = golden_case
    flops = fixture["flops"]
    confidence, correct = exit_stats(probs, targets)
    _, (curve_gflops, curve_top1) = budget_curve(confidence, correct, flops, calib_conf=confidence)
    for target in (0.52, 0.7, 1.1, 1.7, 5.0):
        chosen = thresholds_for_budget(confidence, correct, flops, target)
        assert chosen.thresholds.shape == (3,) and chosen.thresholds[-1].item() == -1e8
        top1, gflops = evaluate_thresholds(confidence, correct, flops, chosen.thresholds)
        assert (top1, gflops) == (chosen.top1, chosen.expected_gflops)
        assert gflops <= target
        # at least as good as every standard budget within reach
        reachable = [acc for acc, cost in zip(curve_top1, curve_gflops) if cost <= target]
        assert all(chosen.top1 >= acc for acc in reachable)
    with pytest.raises(ValueError, match="below the cost of the first exit"):
        thresholds_for_budget(confidence, correct, flops, 0.5)


# ------------------------------------------------------------ the evaluation loop

def confident_tiny() -> torch.nn.Module:
    """A seeded DVT_tiny (32 px, 3 classes) whose heads are scaled up: confidences spread over (1/3, 1)."""
    import models

    torch.manual_seed(0)
    model = models.build_dvt("DVT_tiny", img_size=32, num_classes=3).eval()
    with torch.no_grad():
        for stage in model.stages:
            stage.head.weight.mul_(30.0)
    return model


def test_one_loop_gives_statistics_early_exit_and_validation():
    """collect_exit_stats, collect_early_exit and validation_run (exit_batches underneath)
    agree with the model's own forward passes and with the simulated early exit."""
    from utils.budget.stats import collect_early_exit, collect_exit_stats, exit_shares, expected_gflops, validation_run

    model = confident_tiny()
    images, targets = torch.randn(10, 3, 32, 32), torch.randint(0, 3, (10,))
    loader = [(images[i:i + 4], targets[i:i + 4]) for i in range(0, 10, 4)]
    with torch.no_grad():
        logits = model(images)
    want_conf, want_correct = exit_stats(torch.stack(logits).float().softmax(dim=-1), targets)
    conf, correct = collect_exit_stats(model, loader, progress=False)
    torch.testing.assert_close(conf, want_conf)
    assert torch.equal(correct, want_correct)

    thresholds = torch.tensor([midway(conf[0]), midway(conf[1]), -1e8])
    run = collect_early_exit(model, loader, thresholds)
    assert torch.equal(run.exit_index, exit_assignment(conf, thresholds)) and torch.equal(run.targets, targets)
    assert sum(exit_shares(run.exit_index, 3)) == pytest.approx(1.0)
    assert expected_gflops([0.5, 0.25, 0.25], [1.0, 2.0, 4.0]) == 2.0

    val = validation_run(model, loader, "cpu", None, [thresholds, thresholds], progress=False)
    assert torch.equal(val.confidence, conf) and torch.equal(val.targets, targets)
    assert torch.equal(val.prediction, torch.stack([x.argmax(dim=-1) for x in logits]))
    assert len(val.early) == 2 and all(torch.equal(r.exit_index, run.exit_index) for r in val.early)
    assert val.seconds > 0 and all(r.seconds > 0 for r in val.early)


@pytest.mark.parametrize("batch", [3, 4])
def test_queued_validation_answers_every_sample_as_batch_by_batch(batch):
    """validation_run and collect_early_exit with ``queued``: one stream per threshold set, the
    later stages on samples gathered across batches (stage calls counted), and every sample's
    exit, prediction and target those of the batch-by-batch run, in loader order (a short last
    batch included); a single-exit model runs batch by batch."""
    import models
    from utils.budget.stats import collect_early_exit, validation_run

    model = confident_tiny()
    images, targets = torch.randn(11, 3, 32, 32), torch.randint(0, 3, (11,))
    loader = [(images[i:i + batch], targets[i:i + batch]) for i in range(0, 11, batch)]
    plain = collect_early_exit(model, loader, torch.tensor([-1e8, -1e8, -1e8]))
    conf = validation_run(model, loader, "cpu", None, progress=False).confidence
    thresholds = torch.tensor([conf[0].quantile(0.4).item(), conf[1].quantile(0.4).item(), -1e8])
    per_batch = collect_early_exit(model, loader, thresholds)
    assert set(per_batch.exit_index.tolist()) == {0, 1, 2} and torch.equal(plain.exit_index, torch.zeros(11).long())

    calls = []
    steps = model.exit_steps()
    recorded = [lambda x, *c, k=k: calls.append((k, x.shape[0])) or steps[k](x, *c) for k in range(3)]
    model.exit_steps = lambda: recorded
    val = validation_run(model, loader, "cpu", None, [thresholds, thresholds], progress=False, queued=True)
    calls.clear()  # the timed run warms up batch by batch
    queued = collect_early_exit(model, loader, thresholds, queued=True)
    for run in val.early + [queued]:
        for field in ("exit_index", "prediction", "targets"):
            assert torch.equal(getattr(run, field), getattr(per_batch, field)), field
    stage2 = [n for k, n in calls if k == 1]
    assert stage2 and all(n == batch for n in stage2[:-1])  # full queues but the stream's end
    assert all(r.seconds > 0 for r in val.early)

    single = models.create_cascade("vit_tiny_patch16_224", num_classes=3, img_size=32, patch_size=8, depth=1,
                                   embed_dim=32, num_heads=2).eval()
    run = collect_early_exit(single, loader, torch.tensor([-1e8]), queued=True)
    assert torch.equal(run.targets, targets) and torch.equal(run.exit_index, torch.zeros(11).long())


def test_stored_thresholds_one_reader():
    """The stored table reads the same from a tensor, numpy or lists; None when absent; its
    shape is checked, and a table of no rows refused."""
    import numpy as np

    from utils.budget.choice import stored_table, stored_thresholds
    from utils.errors import CheckpointError

    rows = torch.tensor([[0.9, 0.8, -1e8], [0.7, 0.6, -1e8]])
    for stored in (rows, rows.numpy(), rows.tolist(), np.asarray(rows.tolist())):
        got = stored_thresholds({"dynamic_threshold": stored}, 3, "ckpt", torch.float32)
        assert got.dtype == torch.float32 and torch.equal(got, rows)
    assert stored_thresholds({}, 3, "ckpt") is None
    with pytest.raises(CheckpointError, match="must be \\(budgets, 2\\)"):
        stored_thresholds({"dynamic_threshold": rows}, 2, "ckpt")
    for empty in (torch.empty(0, 3), []):
        with pytest.raises(CheckpointError, match="must be \\(budgets, 3\\)"):
            stored_table({"dynamic_threshold": empty}, 3, "ckpt")

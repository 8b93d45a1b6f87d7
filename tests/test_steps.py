"""Skipping non-finite training steps on the device, counting them, stopping after K in a row."""
from __future__ import annotations

import pytest
import torch
from timm.optim import create_optimizer_v2

from utils.errors import ConfigError
from utils.run.distributed import DistEnv
from utils.train.guard import (
    NonFiniteLossError,
    StepGuard,
    fused_kwargs,
    parse_injections,
    scaler_scale,
    scaler_skipped,
)


def model_and_optimizer(opt: str = "adamw"):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = create_optimizer_v2(model, opt=opt, lr=1e-2, weight_decay=0.05, **fused_kwargs(opt))
    return model, optimizer


def snapshot(model, optimizer):
    return [p.detach().clone() for p in model.parameters()], {
        k: {n: v.clone() for n, v in s.items()} for k, s in optimizer.state.items()}


@pytest.mark.parametrize("opt", ["adamw", "sgd", "lamb"])
def test_a_non_finite_step_changes_nothing(opt):
    model, optimizer = model_and_optimizer(opt)
    guard = StepGuard(DistEnv(), inject=parse_injections(["0:1"]))
    for step, poisoned in enumerate([False, True, False]):
        weights, state = snapshot(model, optimizer)
        optimizer.zero_grad()
        loss = guard.poison(model(torch.randn(2, 4)).sum().reshape(1), 0, step).sum()
        loss.backward()
        bad = guard.loss_flag(loss)
        assert bad.item() == float(poisoned)
        guard.optimizer_step(optimizer, bad)
        guard.record(bad, 0, step)
        same = all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
        assert same == poisoned
        if poisoned:  # the optimizer's moments and step counts did not move either
            for k, s in state.items():
                assert all(torch.equal(v, optimizer.state[k][n]) for n, v in s.items())
    assert optimizer.defaults.get("fused", False) == (opt != "lamb")
    result = guard.sync(stop_requested=False, bad_images=2)
    assert (result.skipped, result.worst_run, result.bad_images, result.stop) == (1, 1, 2, False)


def test_k_consecutive_bad_steps_stop(caplog):
    guard = StepGuard(DistEnv(), max_bad_steps=3)
    for step, bad in enumerate([1., 1., 0., 1., 1.]):
        guard.record(torch.tensor(bad), 2, step)
    with caplog.at_level("WARNING", logger="dvt.train"):
        assert guard.sync(stop_requested=True).skipped == 4
    assert "skipped 4 step(s)" in caplog.text and "epoch 2, step 4" in caplog.text
    guard.record(torch.tensor(1.), 2, 5)
    with pytest.raises(NonFiniteLossError, match="3 training steps in a row.*epoch 2, step 5.*--max-bad-steps 3"):
        guard.sync(stop_requested=False)


def test_injection_spec():
    assert parse_injections(["1:0", "0:3@1"]) == {(1, 0, -1), (0, 3, 1)}
    with pytest.raises(ConfigError, match="EPOCH:STEP"):
        parse_injections(["1-0"])
    guard = StepGuard(DistEnv(rank=1, world_size=1), inject=parse_injections(["0:3@1", "0:4@0"]))
    assert guard.poison(torch.ones(2), 0, 3).isnan().all()
    assert guard.poison(torch.ones(2), 0, 4).isfinite().all()  # another rank's step


def test_grad_scaler_overflow_is_counted():
    """fp16 with a GradScaler: an overflow lowers the scale and skips the step; that is counted."""
    model, optimizer = model_and_optimizer()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    flags = []
    for overflow in (False, True, False):
        before = scaler_scale(scaler)
        optimizer.zero_grad()
        scaler.scale(model(torch.randn(2, 4)).sum()).backward()
        if overflow:
            model.weight.grad.fill_(float("inf"))
        scaler.step(optimizer)
        scaler.update()
        flags.append(scaler_skipped(scaler, before, torch.device("cpu")).item())
    assert flags == [0.0, 1.0, 0.0]

"""--grad-accum-steps: an optimizer update sums the gradients of N batches, so that a run on fewer
processes reaches a recipe's global batch. N batches of b images give the update of one batch of
N x b (up to rounding), on one process and under DDP (whose gradient all-reduce waits for the
group's last batch), with a short last group, through a gradient scaler, and a non-finite loss
anywhere in a group skips that group's update."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.utils import NativeScaler

from utils.run.distributed import DistEnv
from utils.train.guard import StepGuard, fused_kwargs, parse_injections
from utils.train.loop import TrainContext, train_one_epoch, update_groups, updates_per_epoch
from utils.train.recipe import global_batch

pytestmark = pytest.mark.usefixtures("one_thread")


class TwoExits(nn.Module):
    """A cascade's interface at its smallest: a tuple of per-exit logits."""

    num_exits = 2

    def __init__(self) -> None:
        super().__init__()
        self.first, self.norm, self.second = nn.Linear(12, 3), nn.LayerNorm(12), nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.flatten(1)
        return self.first(x), self.second(torch.tanh(self.norm(x)))


class Loader(list):
    """Batches as a loader gives them (a list's ``count`` method would read as unreadable images)."""

    count = 0


def batches(sizes: list[int], seed: int = 0) -> Loader:
    g = torch.Generator().manual_seed(seed)
    images, targets = torch.randn(sum(sizes), 3, 2, 2, generator=g), torch.randint(0, 3, (sum(sizes),), generator=g)
    return Loader(zip(images.split(sizes), targets.split(sizes)))


def joined(loader: list) -> Loader:
    """One batch of every image of ``loader``."""
    return Loader([(torch.cat([a for a, _ in loader]), torch.cat([b for _, b in loader]))])


def train(model: nn.Module, loader: list, accum: int, opt: str = "adamw", scaler: bool = False,
          inject: tuple[str, ...] = (), env: DistEnv = DistEnv()) -> tuple[list[torch.Tensor], int, StepGuard]:
    optimizer = create_optimizer_v2(model, opt=opt, lr=0.05, weight_decay=0.01, **fused_kwargs(opt))
    guard = StepGuard(env, inject=parse_injections(inject))
    ctx = TrainContext(optimizer=optimizer, loss_fn=nn.CrossEntropyLoss(), env=env, seed=0, log_interval=0,
                       loss_scaler=NativeScaler(device="cpu") if scaler else None, guard=guard, accum_steps=accum)
    result = train_one_epoch(model, loader, ctx, epoch=0, num_updates=0)
    return [p.detach().clone() for p in model.parameters()], result.num_updates, guard


def fresh() -> TwoExits:
    torch.manual_seed(0)
    return TwoExits()


def test_update_groups():
    assert update_groups(1, 0, 3) == [(0, 1), (1, 1), (2, 1)]
    assert update_groups(2, 0, 5) == [(0, 2), (2, 2), (4, 1)]  # the last one short
    assert update_groups(3, 4, 8) == [(4, 2), (6, 2)]  # resumed inside a group: the first one short
    assert [updates_per_epoch(s, 2) for s in (1, 4, 5)] == [1, 2, 3]

    class Args:
        batch_size, grad_accum_steps = 16, 4
    assert global_batch(Args, 8) == 512


@pytest.mark.parametrize("opt, scaler", [("adamw", False), ("sgd", False), ("lamb", False), ("adamw", True)])
def test_accumulated_batches_update_as_one_larger_batch(opt, scaler):
    """5 batches of 4 with N = 2: three updates, of 8, 8 and 4 images, as 8 + 8 + 4 without."""
    accumulated, updates, _ = train(fresh(), batches([4] * 5), accum=2, opt=opt, scaler=scaler)
    whole, whole_updates, _ = train(fresh(), batches([8, 8, 4]), accum=1, opt=opt, scaler=scaler)
    assert (updates, whole_updates) == (3, 3)
    for a, b in zip(accumulated, whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    untouched = [p.detach() for p in fresh().parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(accumulated, untouched))


@pytest.mark.parametrize("scaler", [False, True])
def test_a_non_finite_loss_in_a_group_skips_its_update(scaler):
    """NaN in the second batch of the first group: that update is skipped on the whole (the first
    batch's gradients are not applied alone), the next group's goes on, one skip is counted."""
    skipped, updates, guard = train(fresh(), batches([4] * 4), accum=2, scaler=scaler, inject=("0:1",))
    model = fresh()
    expected, _, _ = train(model, joined(batches([4] * 4)[2:]), accum=1, scaler=scaler)
    # the scaler lowers its scale at the skipped update: the next one unscales by another factor
    for a, b in zip(skipped, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert updates == 2 and guard.sync(stop_requested=False).skipped == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        calls = []
        model = nn.parallel.DistributedDataParallel(fresh())
        model.register_comm_hook(None, lambda state, bucket: (calls.append(1), _allreduce(bucket))[1])
        mine = Loader(batches([4] * 4)[rank::2])  # rank r reads batches r, r + 2: two micro-batches each
        weights, updates, _ = train(model, mine, accum=2, env=DistEnv(rank=rank, world_size=2, backend="gloo"))
        torch.save({"weights": weights, "updates": updates, "allreduces": len(calls)}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _allreduce(bucket):
    tensor = bucket.buffer().div_(dist.get_world_size())
    return dist.all_reduce(tensor, async_op=True).get_future().then(lambda fut: fut.value()[0])


def test_ddp_accumulates_locally_and_all_reduces_once_per_update(tmp_path):
    """Two processes, two batches of 4 each per update: the gradients are all-reduced once (at the
    group's last batch, ``no_sync`` before), and the update is that of the 16 images at once."""
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    whole, _, _ = train(fresh(), joined(batches([4] * 4)), accum=1)
    for saved in ranks:
        assert saved["updates"] == 1 and saved["allreduces"] == 1
        for a, b in zip(saved["weights"], whole):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

"""Process groups: joining the launcher's group (torchrun, ``torch.distributed.launch``) and
the few collectives training needs, each a no-op when the process runs alone."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from ..errors import ConfigError


@dataclass
class DistEnv:
    """Where this process runs: rank among ``world_size`` processes, its device and backend."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: Optional[str] = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: Optional[str] = None) -> torch.device:
    """The device ``--device`` names (default: CUDA when available, else the CPU), refusing a
    name torch does not know and a CUDA device on a machine without one."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"bad --device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    return device


def setup_distributed(device: Optional[str] = None, backend: Optional[str] = None,
                      local_rank: Optional[int] = None, timeout_minutes: float = 30.) -> DistEnv:
    """Join the process group described by the launcher's environment (torchrun and
    ``torch.distributed.launch`` set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``),
    or run alone when there is none.

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; default CUDA when available. In a
            process group ``"cuda"`` means the GPU of the local rank.
        backend: process-group backend; default NCCL on CUDA, gloo on the CPU.
        local_rank: ``--local-rank`` of the legacy launcher, used when ``LOCAL_RANK`` is unset.
        timeout_minutes: collective timeout.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", local_rank if local_rank is not None else 0))
    dev = resolve_device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local if world_size > 1 else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    env = DistEnv(rank=rank, world_size=world_size, local_rank=local, device=dev)
    if world_size > 1:
        env.backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        # one store key prefix per torchrun restart round (see utils.run.distributed)
        init_process_group(env.backend, rank, world_size, timedelta(minutes=timeout_minutes))
    return env


def launcher_rank() -> int:
    """This process's rank as the launcher's environment gives it (0 outside a launcher), readable
    before the process group is joined: who prints and writes."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def join_launcher(device: Optional[str] = None) -> DistEnv:
    """The launcher's process group (:func:`setup_distributed`) when it started several
    processes; else this process alone on ``device`` (:func:`resolve_device`), exactly as
    without a launcher."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return setup_distributed(device)
    return DistEnv(device=resolve_device(device))


def gather_in_order(index: torch.Tensor, tensors: Sequence[torch.Tensor], size: int) -> list[torch.Tensor]:
    """Every rank's share of per-sample tensors put back in dataset order, on every rank.

    Args:
        index: ``(n,)`` the dataset positions of this rank's samples.
        tensors: each ``(..., n)``: this rank's values, one per sample along the last dimension.
        size: the number of samples over all ranks (every position held by exactly one rank).

    Returns:
        each tensor as ``(..., size)``; alone, the tensors as they are.
    """
    if not _active():
        return list(tensors)
    parts = all_gather_objects((index.cpu(), [t.cpu() for t in tensors]))
    out = []
    for j, t in enumerate(tensors):
        dtype = next((values[j].dtype for where, values in parts if len(where)), t.dtype)  # an empty share's is a guess
        full = torch.empty(*t.shape[:-1], size, dtype=dtype)
        for where, values in parts:
            full[..., where] = values[j]
        out.append(full)
    return out


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``"sum"`` or ``"max"``); a no-op outside a process group."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if _active():
        dist.barrier()


def agreed_flags(env: DistEnv, *flags: bool | torch.Tensor) -> list[bool]:
    """Each flag OR-ed over all ranks (one small all-reduce), so every rank takes the same branch."""
    t = torch.stack([torch.as_tensor(f, dtype=torch.float32, device=env.device).reshape(()) for f in flags])
    return [v > 0 for v in all_reduce_(t, "max").tolist()]


def on_rank_zero(make: Any) -> Any:
    """``make()`` run by rank 0 alone (a dataset scan, say), its result sent to every rank; an
    exception it raises is raised on every rank, so none waits for a result that never comes."""
    result, error = None, None
    if not _active() or dist.get_rank() == 0:
        try:
            result = make()
        except Exception as e:  # noqa: BLE001  (re-raised on every rank below)
            error = e
    result, error = broadcast_object((result, error))
    if error is not None:
        raise error
    return result


# Settings that do not change what a run computes: a re-launch that changes them is the same run.
NOT_IDENTITY = ("workers", "log_interval", "progress", "pin_mem", "recovery_interval", "auto_resume",
                "resume", "experiment", "output", "device", "dist_backend", "data", "data_dir", "release",
                "release_weights", "max_bad_steps", "inject_nonfinite", "bad_images", "bad_images_max_fraction")


def restart_round() -> int:
    """This process's torchrun restart round (0 for the first start, and outside torchrun)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def under_elastic_launcher() -> bool:
    """True when torchrun (``torch.distributed.run``) started this process."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "TORCHELASTIC_RESTART_COUNT" in os.environ


def init_process_group(backend: str, rank: int, world_size: int, timeout: timedelta) -> None:
    """``dist.init_process_group`` from the launcher's ``MASTER_ADDR``/``MASTER_PORT``, with
    keys under a prefix of this restart round, so nothing of an earlier round is read again.

    Args:
        backend: ``"nccl"`` or ``"gloo"``.
        rank: this process's global rank.
        world_size: number of processes.
        timeout: collective and rendezvous timeout.
    """
    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ.get("MASTER_PORT", "29500"))
    # torchrun's agent hosts the store (and the workers are only clients) unless the launcher
    # runs with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1; the legacy launcher never hosts one.
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0 and not agent_hosts, timeout=timeout,
                          multi_tenant=not agent_hosts)
    prefixed = dist.PrefixStore(f"dvt/round{restart_round()}", store)
    dist.init_process_group(backend, store=prefixed, rank=rank, world_size=world_size, timeout=timeout)


def run_key(config: Mapping[str, Any]) -> str:
    """An 8-hex-digit name of what a run computes: the same for the same settings (whatever
    the folder, worker count or logging), different when the model, data recipe or seed differ.

    Args:
        config: the run's resolved settings (:func:`utils.run.config.resolved_config`).
    """
    identity = {k: v for k, v in sorted(config.items()) if k not in NOT_IDENTITY}
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def derived_experiment(config: Mapping[str, Any], model: str, img_size: int) -> Optional[str]:
    """The run folder name of a run started by torchrun without ``--experiment``:
    ``MODEL-SIZE-KEY`` with :func:`run_key`, so a restarted round, and the same command
    launched again after a preemption, find the run; None outside torchrun."""
    if not under_elastic_launcher():
        return None
    return f"{model}-{img_size}-{run_key(config)}"

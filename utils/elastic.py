"""Runs that survive restarts: joining the process group in every restart round of torchrun,
and the run folder a restarted or re-launched run finds again.

torchrun (``--max-restarts N``) restarts every worker when one dies, with the same command
line and ``TORCHELASTIC_RESTART_COUNT`` raised by one. Its agent serves the workers' rendezvous
store and keeps it across rounds, so keys written in a failed round are read again in the
next one and the restarted workers can wait for ever in ``init_process_group`` (with gloo on
torch 2.14, most of the time). Each round therefore joins through its own key prefix.
"""
from __future__ import annotations

import hashlib
import json
import os
from datetime import timedelta
from typing import Any, Mapping, Optional

import torch.distributed as dist

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
        config: the run's resolved settings (``main.resolved_config``).
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

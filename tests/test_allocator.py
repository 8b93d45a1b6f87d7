"""glibc's malloc told to keep large freed blocks: by the commands at start, never against the
user's own settings."""
from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import SUBPROCESS_ENV
from utils.run.allocator import _glibc

pytestmark = pytest.mark.skipif(not _glibc(), reason="glibc's malloc only")

# Prints the allocator choice, then where a fresh 64 MiB tensor lives: "[heap]" once the settings
# are made (blocks up to 256 MiB come from the heap), an anonymous mapping of its own otherwise.
PROBE = """
import sys, torch
from utils.run.allocator import allocator_choice, keep_freed_memory
{setup}
t = torch.empty(64 << 20, dtype=torch.uint8)
for line in open("/proc/self/maps"):
    lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
    if lo <= t.data_ptr() < hi:
        print(allocator_choice(), line.split()[5] if len(line.split()) > 5 else "own mapping")
"""


def where_a_large_tensor_lives(setup: str, tmp_path, **env: str) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE.format(setup=setup)], cwd=tmp_path, capture_output=True,
                         text=True, env={**SUBPROCESS_ENV, **env}, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_keep_freed_memory_puts_large_blocks_on_the_heap(tmp_path):
    assert where_a_large_tensor_lives("pass", tmp_path) == "keep own mapping"
    assert where_a_large_tensor_lives("assert keep_freed_memory()", tmp_path) == "keep [heap]"


@pytest.mark.parametrize("env,reason", [
    ({"DVT_MALLOC": "default"}, "DVT_MALLOC=default"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "GLIBC_TUNABLES sets malloc"),
    ({"MALLOC_TRIM_THRESHOLD_": "1000000"}, "MALLOC_TRIM_THRESHOLD_ set"),
])
def test_the_users_own_choice_is_left_alone(env, reason, tmp_path):
    assert where_a_large_tensor_lives("assert not keep_freed_memory()", tmp_path, **env) == f"{reason} own mapping"


@pytest.mark.parametrize("command", ["inference", "main"])
def test_the_commands_keep_freed_memory(command, tmp_path):
    """Both commands make the settings once their options are read, before any work (here a run
    refused for its missing data or checkpoint), through keep_freed_memory (which leaves the
    user's own choice alone: the test above)."""
    argv = {"inference": ["--checkpoint_path", "missing.pth.tar", "--data_url", "nowhere"],
            "main": ["nowhere", "--model", "DVT_tiny", "--output", str(tmp_path / "out")]}[command]
    setup = f"import {command}; assert {command}.main({argv!r}) != 0"
    assert where_a_large_tensor_lives(setup, tmp_path) == "keep [heap]"


@pytest.mark.parametrize("command", ["inference", "main"])
def test_a_mistyped_opt_out_is_refused_before_any_work(command, tmp_path, monkeypatch, capsys):
    """``DVT_MALLOC=defualt`` would silently keep the settings it meant to turn off: both commands
    refuse it in one line naming the variable, and main.py writes nothing."""
    import importlib
    argv = {"inference": ["--checkpoint_path", "missing.pth.tar", "--data_url", "nowhere"],
            "main": ["nowhere", "--model", "DVT_tiny", "--output", str(tmp_path / "out")]}[command]
    monkeypatch.setenv("DVT_MALLOC", "defualt")
    monkeypatch.chdir(tmp_path)
    if command == "inference":  # its checkpoint check comes first: give it a file
        (tmp_path / "missing.pth.tar").write_bytes(b"")
    assert importlib.import_module(command).main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "DVT_MALLOC='defualt'" in err[0] and "DVT_MALLOC=default" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["missing.pth.tar"] if command == "inference" else [])

"""Constants and helpers shared by the test modules (the shared fixtures are in conftest.py)."""
from __future__ import annotations

import ast
import csv
import hashlib
import os
import socket
import subprocess
from pathlib import Path

import torch

import inference
import main as train_main
import models
from utils.precision import AUTO, resolve_precision

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny_cpu.yaml")
# Each subprocess gets one thread: two CPU-bound processes share two cores.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
# Bit-reproducible short runs that log every step.
EXACT = ("--deterministic", "--no-release", "--aa", "none", "--log-interval", "1")
RESULT_KEYS = ("flops", "anytime_classification", "budgeted_batch_classification")


# ------------------------------------------------------------------------- main.py runs

def main_args(data: Path, out: Path, *extra: str, experiment: str | None = "run") -> list[str]:
    """main.py's arguments for a run of the tiny CPU config on ``data`` into ``out``; without an
    ``experiment`` the run folder's name is derived from the settings."""
    named = ["--experiment", experiment] if experiment else []
    return [str(data), "--config", TINY, "--device", "cpu", "--output", str(out), *named, "--no-progress", *extra]


def quick_args(data: Path, out: Path, *extra: str, experiment: str | None = "run") -> list[str]:
    """A finished run in seconds: one epoch, a small calibration set, no step log."""
    return main_args(data, out, "--epochs", "1", "--calib-size", "8", "--log-interval", "0", *extra,
                     experiment=experiment)


def run_main(capsys, argv: list[str]) -> tuple[int, str, str]:
    """main.py in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    code = train_main.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def run_inference(capsys, *argv) -> tuple[int, str, str]:
    """inference.py in this process, on the CPU without loader workers: (exit status, stdout, stderr)."""
    capsys.readouterr()
    code = inference.main([str(a) for a in argv] + ["--no_progress", "--workers", "0", "--device", "cpu"])
    out, err = capsys.readouterr()
    return code, out, err


def cpu_amp_dtype() -> torch.dtype | None:
    """What a bare ``--amp`` runs on this machine's CPU: bfloat16 where it is native, else None
    (float32)."""
    return resolve_precision(AUTO, torch.device("cpu")).dtype


# ----------------------------------------------------------------------------- outputs

def error_line(err: str) -> str:
    """The one ``error:`` line of a failed command, with no traceback around it."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


def printed_results(out: str) -> dict:
    """The ``name : value`` result lines inference.py prints."""
    found = {}
    for line in out.splitlines():
        key, sep, value = line.partition(" : ")
        if sep and key in RESULT_KEYS:
            found[key] = ast.literal_eval(value)
    assert set(found) == set(RESULT_KEYS), out
    return found


def read_summary(path: Path) -> list[dict[str, str]]:
    """The rows of a run's summary.csv."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def untimed(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Summary rows without their timings, which differ from run to run."""
    return [{k: v for k, v in r.items() if not k.endswith(("img_per_s", "time_s"))} for r in rows]


def same_weights(a: dict, b: dict) -> bool:
    """Two training checkpoints hold the same weights (model and EMA) at the same point."""
    keys = ("model", "model_ema", "epoch", "step", "num_updates")
    return all(k in a and k in b for k in keys) and all(
        torch.equal(a[k][n], b[k][n]) for k in ("model", "model_ema") for n in a[k]) and all(
        a[k] == b[k] for k in ("epoch", "step", "num_updates"))


def only_folder(out: Path) -> Path:
    """The one run folder under ``out/train``."""
    runs = [p for p in (out / "train").iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


# ------------------------------------------------------------------------------- disk

def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and folder under ``root``: content hash, size, mode and mtime."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        digest = hashlib.sha1(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        out[str(path.relative_to(root))] = (digest, st.st_size, st.st_mode, st.st_mtime_ns)
    return out


def mount_tmpfs(where: Path, size_bytes: int, read_only: bool = False) -> bool:
    """A small tmpfs at ``where`` (tests run as root in CI); False where mounting is not allowed."""
    where.mkdir(parents=True, exist_ok=True)
    options = f"size={size_bytes}" + (",ro" if read_only else "")
    try:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                                capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def umount(where: Path) -> None:
    subprocess.run(["umount", str(where)], capture_output=True, timeout=20)


def free_port() -> int:
    """A port free at the time of the call; another process may take it before it is used, so
    launchers that can pick their own (``torchrun --standalone``) should."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_pids(parent: int) -> list[int]:
    """The processes whose parent is ``parent`` (a loader's or torchrun's workers), from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                found.append(int(entry))
    return sorted(found)



def spread_cascade(name: str = "DVT_tiny", img_size: int = 32, num_classes: int = 5, head_scale: float = 30.0,
                   seed: int = 0, **overrides) -> models.DVT:
    """A seeded cascade with one block per stage, in eval mode, its heads scaled up so that the
    confidences spread out; ``overrides``: more :class:`models.DVT` arguments."""
    torch.manual_seed(seed)
    model = models.build_dvt(name, img_size=img_size, depth=1, num_classes=num_classes, **overrides)
    with torch.no_grad():
        for stage in model.stages:
            stage.head.weight.mul_(head_scale)
    return model.eval()


def midway(values: torch.Tensor, share: float = 0.5) -> float:
    """A threshold half-way between two neighbouring ``values``, about ``share`` of them above it
    (at least one on each side), and no value on it: early exit computes an exit's confidence
    with other products than ``forward``, so a value on a threshold may fall either way."""
    v = values.sort(descending=True).values
    n = max(1, min(len(v) - 1, round(share * len(v))))
    return float(v[n - 1] + v[n]) / 2


def spread_thresholds(model: models.DVT, x: torch.Tensor) -> torch.Tensor:
    """Thresholds half-way between neighbouring confidences (so rounding cannot move an image
    across) that stop about a third of ``x`` at exit 1 and half of the rest at exit 2."""
    with torch.no_grad():
        conf = torch.stack(model(x)).softmax(dim=-1).amax(dim=-1)  # (E, B)
    t0 = midway(conf[0], 1 / 3)
    return torch.tensor([t0, midway(conf[1][conf[0] < t0]), -1e8])

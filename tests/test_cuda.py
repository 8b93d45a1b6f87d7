"""What differs on a CUDA device, checked on one: the golden outputs in float32, under float16 and
bfloat16 autocast and with bfloat16 weights; real early exit against its simulation; training
with float16 autocast and a gradient scaler, and with bfloat16; exact resume; torchrun (NCCL);
``main.py --compile``; ``inference.py --predict``.

Every test here is marked ``cuda`` and skipped where ``torch.cuda.is_available()`` is False:
``python -m pytest -m cuda`` runs them alone; ``scripts/gpu_check.sh`` runs them and records
each result in its report. The command-line tools run in child processes, as a user runs them,
each with a fresh CUDA context.
"""
from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pytest
import torch

import models
from golden import VARIANTS, golden_input, load_expected
from test_models import golden_model
from test_predict import FLOPS, exit_confidences, labelled, project_checkpoint, read_csv, simulate, \
    tiny_model, val_paths  # noqa: F401  (labelled: a fixture)
from test_train import DETERMINISTIC, REPO, SUBPROCESS_ENV, TINY, assert_same_training_state, \
    check_released_with_inference, free_port, read_summary, run_dir
from utils.checkpoint import load_checkpoint_file
from utils.precision import autocast_context, resolve_precision

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")
# Largest |logit - the original's float32 logit| allowed on the golden weights (the logits'
# standard deviation is about 1). The same dtypes on a CPU with native half precision give about
# 0.004 (float16 autocast) and 0.036 (bfloat16 autocast) on every golden variant; bfloat16 keeps
# the CPU tests' bound.
HALF_TOL = {torch.float16: 0.02, torch.bfloat16: 0.1}
FP32_TOL = 1e-4
# Training that learns in a few steps: no mixup, cutmix, RandAugment or erasing; 6 steps an epoch.
LEARNABLE = ("--epochs", "3", "--batch-size", "4", "--mixup", "0", "--cutmix", "0", "--aa", "none", "--reprob", "0",
             "--lr", "3e-3", "--no-release")
TEST_ENV = {**SUBPROCESS_ENV, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}


# ------------------------------------------------------------------------------ helpers

@pytest.fixture
def ieee_fp32():
    """Full float32 products. cuDNN convolutions use TF32 (a 10-bit mantissa) by default, far
    coarser than the golden tolerance; the patch embeddings are convolutions."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def golden_on_cuda():
    """``get(variant)``: the golden model of ``variant`` on the GPU, built once per module."""
    built: dict[str, torch.nn.Module] = {}

    def get(variant: str) -> torch.nn.Module:
        if variant not in built:
            built[variant] = golden_model(variant).to(CUDA)
        return built[variant]

    yield get
    built.clear()
    torch.cuda.empty_cache()


def run_logged(cmd: Sequence[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a command from the repository root; on a time-out, fail with what it printed."""
    try:
        return subprocess.run([str(c) for c in cmd], cwd=REPO, env=TEST_ENV, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"{' '.join(map(str, cmd[:4]))} ... still running after {timeout} s; its output:\n"
                    f"{(out + err)[-6000:]}")


def tail(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout[-3000:] + proc.stderr[-3000:]


def train_on_cuda(data: Path, out: Path, name: str, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python main.py`` on the GPU with the tests' tiny config."""
    return run_logged([sys.executable, REPO / "main.py", data, "--config", TINY, "--device", "cuda", "--output", out,
                       "--experiment", name, "--log-interval", "1", "--no-progress", *extra], timeout)


def header_line(proc: subprocess.CompletedProcess) -> str:
    """The run's one summary line (model, processes, device, precision)."""
    lines = [line for line in proc.stdout.splitlines() + proc.stderr.splitlines() if "parameters" in line]
    assert len(lines) == 1, tail(proc)
    return lines[0]


def train_losses(folder: Path) -> list[float]:
    return [float(row["train_loss"]) for row in read_summary(folder / "summary.csv")]


def widest_gap_thresholds(conf: torch.Tensor, keep: int = 2) -> list[float]:
    """One threshold per exit, in the widest gap between the confidences of the samples that
    reach that exit, with at least ``keep`` samples leaving there and enough going on for the
    exits after it; the last threshold takes everyone left.

    Args:
        conf: (exits, samples) max softmax probability of every exit.
    """
    exits, n = conf.shape
    reach = torch.ones(n, dtype=torch.bool)
    thresholds = []
    for k in range(exits - 1):
        v = conf[k][reach].sort(descending=True).values
        leave = range(keep, len(v) - keep * (exits - 1 - k) + 1)  # how many may leave here
        assert len(leave), f"too few samples ({n}) to use every exit"
        i = max(leave, key=lambda m: (v[m - 1] - v[m]).item())
        thresholds.append((v[i - 1] + v[i]).item() / 2)
        reach &= conf[k] < thresholds[-1]
    return thresholds + [-1e8]


def simulated_exits(conf: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """(samples,) the first exit whose confidence reaches its threshold (the last one otherwise)."""
    t = torch.tensor(thresholds[:-1], dtype=conf.dtype).unsqueeze(1)
    reached = torch.cat([conf[:-1] >= t, torch.ones(1, conf.shape[1], dtype=torch.bool)])
    return reached.float().argmax(dim=0)


def threshold_clearance(conf: torch.Tensor, thresholds: Sequence[float], logit_noise: float) -> float:
    """How safely the exits of ``conf`` (exits, samples) are decided: the smallest ratio, over the
    samples and the exits each reaches (but the last), of the distance from its confidence to the
    threshold to the most that a change of ``logit_noise`` in every logit can move a max softmax
    probability p (2 p (1 - p) logit_noise). Above 1, no such change moves a sample to another exit."""
    exits = simulated_exits(conf, thresholds)
    worst = math.inf
    for k in range(conf.shape[0] - 1):
        p = conf[k][exits >= k]
        worst = min(worst, ((p - thresholds[k]).abs() / (2 * p * (1 - p) * logit_noise)).min().item())
    return worst


# ----------------------------------------------------------------------- golden outputs

def golden_logits(model: torch.nn.Module, amp: Optional[torch.dtype] = None) -> torch.Tensor:
    """(exits, 3, classes) logits of the golden input, on the CPU."""
    with torch.no_grad(), autocast_context(CUDA, amp):
        return torch.stack(model(golden_input(1, 3).to(CUDA))).cpu()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_golden_logits_float32(variant, golden_on_cuda, ieee_fp32):
    logits = golden_logits(golden_on_cuda(variant))
    assert logits.dtype == torch.float32
    np.testing.assert_allclose(logits.numpy(), load_expected()[variant], rtol=0, atol=FP32_TOL)


@pytest.mark.parametrize("amp", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_golden_logits_under_autocast(variant, amp, golden_on_cuda):
    logits = golden_logits(golden_on_cuda(variant), amp)
    assert logits.dtype == amp  # the heads ran under autocast
    expected = torch.from_numpy(load_expected()[variant])
    err = (logits.float() - expected).abs().max().item()
    assert err < HALF_TOL[amp], err
    assert (logits.float().argmax(-1) == expected.argmax(-1)).float().mean() >= 0.5


@pytest.mark.parametrize("variant", ["DVT_Deit_small", "DVT_T2t_vit_12"])
def test_golden_logits_with_bf16_weights(variant, golden_on_cuda):
    """``model.to(torch.bfloat16)`` takes float32 images and computes in bfloat16 (the
    Performer's random features in float32); early exit with nobody leaving before the last exit
    gives the all-exit logits bit for bit."""
    model = copy.deepcopy(golden_on_cuda(variant)).to(torch.bfloat16)
    x = golden_input(1, 3).to(CUDA)
    with torch.no_grad():
        logits = torch.stack(model(x))
        exits = model.forward_early_exit(x, thresholds=torch.tensor([2.0, 2.0, -1e8]))
    assert logits.dtype == torch.bfloat16
    err = (logits.float().cpu() - torch.from_numpy(load_expected()[variant])).abs().max().item()
    assert err < HALF_TOL[torch.bfloat16], err
    torch.testing.assert_close(exits.logits, logits[-1], rtol=0, atol=0)
    assert exits.exit_index.tolist() == [2, 2, 2]


# ------------------------------------------------------------------------ real early exit

# Largest change of a logit expected when a sample runs in a batch of another size (other kernels,
# other summation orders). On a CPU, float16 autocast gives none and bfloat16 autocast up to 0.03,
# too much for the gaps between the golden confidences: bfloat16 is left out.
BATCH_NOISE = {None: 1e-5, torch.float16: 0.005}


@pytest.mark.parametrize("variant, amp", [
    ("DVT_Deit_small", None), ("DVT_T2t_vit_12", None), ("DVT_Deit_small", torch.float16),
    ("DVT_T2t_vit_12", torch.float16)], ids=["deit-fp32", "t2t-fp32", "deit-fp16", "t2t-fp16"])
def test_real_early_exit_equals_simulation(variant, amp, golden_on_cuda, ieee_fp32):
    """Every stage run only on the samples still in the cascade gives each sample the exit, the
    logits and the confidence of the simulation (all exits on the whole batch, then the first
    exit whose confidence reaches its threshold), up to the rounding of other batch sizes."""
    model = golden_on_cuda(variant)
    x = golden_input(3, 16).to(CUDA)
    with torch.no_grad(), autocast_context(CUDA, amp):
        logits = torch.stack(model(x)).float().cpu()  # (exits, 16, classes)
        conf = logits.softmax(-1).amax(-1)
        thresholds = widest_gap_thresholds(conf)
        out = model.forward_early_exit(x, thresholds)
    assert threshold_clearance(conf, thresholds, BATCH_NOISE[amp]) > 1, "confidences too close to the thresholds"
    expected = simulated_exits(conf, thresholds)
    assert set(expected.tolist()) == {0, 1, 2}  # every exit is used
    assert torch.equal(out.exit_index.cpu(), expected)
    rows = torch.arange(len(expected))
    tol = FP32_TOL if amp is None else HALF_TOL[amp]
    torch.testing.assert_close(out.logits.float().cpu(), logits[expected, rows], rtol=0, atol=tol)
    torch.testing.assert_close(out.confidence.cpu(), conf[expected, rows], rtol=0, atol=tol / 2)


# -------------------------------------------------------------------------------- training

def test_amp_rule_on_this_gpu():
    """A bare --amp is float16 with a gradient scaler on CUDA; bfloat16 needs no warning from
    compute capability 8.0 on."""
    auto = resolve_precision("auto", CUDA)
    assert (auto.dtype, auto.needs_scaler, auto.warning) == (torch.float16, True, None)
    bf16 = resolve_precision("bf16", CUDA)
    assert (bf16.dtype, bf16.needs_scaler) == (torch.bfloat16, False)
    assert (bf16.warning is None) == (torch.cuda.get_device_capability(CUDA) >= (8, 0))


@pytest.mark.parametrize("amp, precision, scaler", [
    (("--amp",), "torch.float16", True), (("--amp-dtype", "bfloat16"), "torch.bfloat16", False)], ids=["fp16", "bf16"])
def test_mixed_precision_training_learns(tmp_path, image_data, amp, precision, scaler):
    """Three epochs of six steps: finite losses that go down; float16 keeps a GradScaler (whose
    first, too large, scales may skip a few steps), bfloat16 none."""
    proc = train_on_cuda(image_data, tmp_path, "run", *LEARNABLE, *amp)
    assert proc.returncode == 0, tail(proc)
    header = header_line(proc)
    assert "1 process(es) on cuda" in header and f"precision {precision}" in header, header
    folder = run_dir(tmp_path, "run")
    losses = train_losses(folder)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < losses[0], losses
    skipped = sum(int(row["train_skipped_steps"]) for row in read_summary(folder / "summary.csv"))
    assert skipped < 9, skipped  # of 18 steps
    last = load_checkpoint_file(folder / "last.pth.tar")
    assert (last["scaler"] is not None) == scaler
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


# Runs main.py with test_train's DVT_tiny_faulty registered: it signals itself at a set step.
FAULTY_MAIN = ("import json, sys\n"
               "import test_train\n"
               "import main\n"
               "test_train.set_faults(**json.loads(sys.argv[1]))\n"
               "sys.exit(main.main(sys.argv[2:]))\n")


def faulty_run(data: Path, out: Path, faults: dict, *extra: str) -> subprocess.CompletedProcess:
    """Two deterministic epochs of three steps of DVT_tiny_faulty on the GPU."""
    return run_logged([sys.executable, "-c", FAULTY_MAIN, json.dumps(faults), data, "--config", TINY, "--device",
                       "cuda", "--output", out, "--experiment", "run", "--log-interval", "1", "--no-progress",
                       *DETERMINISTIC, *extra], timeout=300)


@pytest.fixture(scope="module")
def straight_on_cuda(tmp_path_factory, image_data) -> dict:
    out = tmp_path_factory.mktemp("straight_cuda")
    proc = faulty_run(image_data, out, {})
    assert proc.returncode == 0, tail(proc)
    folder = run_dir(out, "run")
    return {"last": load_checkpoint_file(folder / "last.pth.tar"), "summary": read_summary(folder / "summary.csv")}


def untimed(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if not k.endswith(("img_per_s", "time_s"))} for r in rows]


def test_resume_on_cuda_is_bit_identical(tmp_path, image_data, straight_on_cuda):
    """SIGTERM in the middle of the first epoch, then --resume: the same weights, EMA, optimizer,
    scheduler and epoch summaries as the run that went straight through (deterministic kernels,
    the CUDA random streams restored). tests/test_train.py stops the CPU run at more places."""
    proc = faulty_run(image_data, tmp_path, {"signal_train_at": 2})
    assert proc.returncode == 128 + signal.SIGTERM, tail(proc)
    folder = run_dir(tmp_path, "run")
    saved = load_checkpoint_file(folder / "last.pth.tar")
    assert (saved["epoch"], saved["step"]) == (0, 2)
    proc = faulty_run(image_data, tmp_path, {}, "--resume", folder / "last.pth.tar")
    assert proc.returncode == 0, tail(proc)
    assert_same_training_state(load_checkpoint_file(folder / "last.pth.tar"), straight_on_cuda["last"])
    assert untimed(read_summary(folder / "summary.csv")) == untimed(straight_on_cuda["summary"])


# ---------------------------------------------------------------------------- torchrun, NCCL

def torchrun(data: Path, out: Path, processes: int, name: str) -> subprocess.CompletedProcess:
    return run_logged([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                       f"--master_port={free_port()}", REPO / "main.py", data, "--config", TINY, "--model", "DVT_tiny",
                       "--b", "4", "--amp", "--epochs", "1", "--device", "cuda", "--dist-backend", "nccl", "--output",
                       out, "--experiment", name, "--workers", "1", "--no-progress"], timeout=300)


def test_torchrun_one_process_on_cuda(tmp_path, image_data, capsys):
    """torchrun with one process: main.py runs alone on the GPU (a one-process run makes no process
    group), writes every file, and inference.py reads the released file back on the GPU."""
    proc = torchrun(image_data, tmp_path, 1, "one")
    assert proc.returncode == 0, tail(proc)
    header = header_line(proc)
    assert "1 process(es) on cuda" in header and "precision torch.float16" in header, header
    folder = run_dir(tmp_path, "one")
    last = load_checkpoint_file(folder / "last.pth.tar")
    assert (last["epoch"], last["step"], last["num_updates"], last["world_size"]) == (1, 0, 6, 1)
    check_released_with_inference(folder / "released.pth.tar", image_data, capsys)


NCCL_ALL_REDUCE = ("import sys, torch, torch.distributed as dist\n"
                   "dist.init_process_group('nccl', init_method='file://' + sys.argv[1], rank=0, world_size=1,\n"
                   "                        device_id=torch.device('cuda', 0))\n"
                   "t = torch.arange(4.0, device='cuda')\n"
                   "dist.all_reduce(t)\n"
                   "dist.barrier()\n"
                   "print('all_reduce', t.tolist(), 'nccl', torch.cuda.nccl.version())\n"
                   "dist.destroy_process_group()\n")


def test_nccl_process_group_on_this_gpu(tmp_path):
    """An NCCL group (one rank, as many as one GPU allows) initialises, all-reduces and closes."""
    proc = run_logged([sys.executable, "-c", NCCL_ALL_REDUCE, tmp_path / "store"], timeout=120)
    assert proc.returncode == 0, tail(proc)
    assert "all_reduce [0.0, 1.0, 2.0, 3.0]" in proc.stdout


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_torchrun_two_processes_nccl(tmp_path, image_data, capsys):
    proc = torchrun(image_data, tmp_path, 2, "two")
    assert proc.returncode == 0, tail(proc)
    header = header_line(proc)
    assert "2 process(es) on cuda (nccl)" in header and "precision torch.float16" in header, header
    folder = run_dir(tmp_path, "two")
    last = load_checkpoint_file(folder / "last.pth.tar")
    # 24 images over 2 processes of batch 4: 3 steps
    assert (last["epoch"], last["step"], last["num_updates"], last["world_size"]) == (1, 0, 3, 2)
    check_released_with_inference(folder / "released.pth.tar", image_data, capsys)


# ------------------------------------------------------------------------- inference.py --predict

# Largest change of a logit of the tiny model (heads scaled up: logits up to about 10) from TF32
# convolutions or float16 autocast on the GPU; float16 autocast on a CPU changes them by 0.0075.
PREDICT_NOISE = 0.03


@pytest.mark.parametrize("amp", [(), ("--amp",)], ids=["fp32", "fp16"])
def test_predict_on_cuda_matches_simulation(labelled, tmp_path, amp):  # noqa: F811  (the fixture)
    """inference.py --predict on the GPU gives every image the class and the exit of the
    simulated evaluation on the CPU, with thresholds in the widest gaps between confidences."""
    model = tiny_model()
    ckpt = project_checkpoint(tmp_path / "tiny.pth", model, flops=FLOPS)
    paths = val_paths(labelled)
    conf = exit_confidences(model, paths)
    thresholds = widest_gap_thresholds(conf)
    assert threshold_clearance(conf, thresholds, PREDICT_NOISE) > 1, "confidences too close to the thresholds"
    expected = simulate(model, paths, thresholds)
    out_csv = tmp_path / "preds.csv"
    proc = run_logged([sys.executable, REPO / "inference.py", "--checkpoint_path", ckpt, "--predict", labelled / "val",
                       "--thresholds", *thresholds[:2], "--output", out_csv, "--device", "cuda", "--batch_size", "5",
                       "--workers", "0", "--no_progress", *amp], timeout=180)
    assert proc.returncode == 0, tail(proc)
    assert "on cuda" in proc.stderr and ("autocast torch.float16" in proc.stderr) == bool(amp), proc.stderr[-2000:]
    rows = read_csv(out_csv)
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    for r in rows:
        cls, exit_, confidence = expected[r["path"]]
        assert (int(r["class_index"]), int(r["exit"])) == (cls, exit_), r
        assert float(r["confidence"]) == pytest.approx(confidence, abs=PREDICT_NOISE / 2)
        assert float(r["gflops"]) == FLOPS[exit_ - 1]


# ------------------------------------------------------------------------------ torch.compile
# Last: the compilation takes the longest, and a run stopped by its time limit loses only this.

def test_compiled_training_on_cuda(tmp_path, image_data):
    """main.py --compile (float16 autocast): the compiled model learns, and the checkpoints keep
    the parameter names of the plain model."""
    proc = train_on_cuda(image_data, tmp_path, "compiled", *LEARNABLE, "--epochs", "2", "--compile", "--amp",
                         timeout=540)
    assert proc.returncode == 0, tail(proc)
    losses = train_losses(run_dir(tmp_path, "compiled"))
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses) and losses[1] < losses[0], losses
    last = load_checkpoint_file(run_dir(tmp_path, "compiled") / "last.pth.tar")
    plain = models.build_dvt("DVT_tiny", num_classes=3, img_size=32)  # image_data: 3 classes, 32 px in the config
    assert list(last["model"]) == list(plain.state_dict())

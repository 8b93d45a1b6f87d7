"""scripts/gpu_check.sh and scripts/bench_gpu.py on the CPU, so that the GPU check cannot rot
between the runs on a GPU: the script parses, the benchmark's dry run writes every section, a
spent time budget skips rows instead of running past it, and the per-test table reads junit
files and the logs of runs stopped by their time limit."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import bench_gpu  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SECTIONS = ("### Matrix-product ceilings on cpu", "### All exits: ours, the original, timm's static model",
            "### Real early exit against deit_tiny_patch16_224", "### Training throughput with autocast",
            "### torch.compile against eager, all exits", "### Left to a GPU")


def bench_dry_run(out: Path, budget_s: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/bench_gpu.py", "bench", "--dry-run", "--threads", "1",
                           "--compile-backend", "eager", "--budget-s", str(budget_s), "--out", str(out)],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)


def test_script_parses_and_explains_itself():
    assert subprocess.run(["bash", "-n", "scripts/gpu_check.sh"], cwd=REPO).returncode == 0
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--help"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "--dry-run REPORT.md" in proc.stderr


def test_benchmark_dry_run_writes_every_section(tmp_path):
    out = tmp_path / "bench.md"
    proc = bench_dry_run(out, budget_s=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert [line for line in text.splitlines() if line.startswith("### ")] == list(SECTIONS)
    assert "failed:" not in text and "skipped (time)" not in text, text
    for row in ("| deit_tiny_patch16_224 | timm (static) | fp32 | 4 |", "| DVT_tiny | this | bf16 | 2 |",
                "| DVT_tiny | deit_tiny_patch16_224 | fp32 | 4 |", "| DVT_tiny | bf16 | 4 |", "| DVT_tiny | fp32 | "):
        assert row in text, row
    assert "original implementation: not run (no checkout of the original implementation" in text


@pytest.mark.slow  # the dry run above already goes through every section
def test_spent_budget_skips_rows(tmp_path):
    out = tmp_path / "bench.md"
    proc = bench_dry_run(out, budget_s=0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "| DVT_tiny | | | | | skipped (time) | | | |" in text
    assert "skipped (time): DVT_tiny at batch 2, DVT_tiny at batch 4" in text
    assert "| DVT_tiny | bf16 | 4 | skipped (time) | | |" in text
    assert "| DVT_tiny | fp32 | skipped (time) |" in text


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="3">
<testcase classname="tests.test_cuda" name="test_a[fp16]" time="1.5"/>
<testcase classname="tests.test_cuda" name="test_b" time="0.2">
<failure message="assert 1 == 2 | x">long</failure></testcase>
<testcase classname="tests.test_cuda" name="test_c" time="0.0"><skipped message="needs two GPUs"/></testcase>
</testsuite></testsuites>
"""
STOPPED_LOG = """tests/test_cuda.py::test_a[fp16] PASSED                                [ 33%]
tests/test_cuda.py::test_b FAILED                                        [ 66%]
"""
COLLECTED = """tests/test_cuda.py::test_a[fp16]
tests/test_cuda.py::test_b
tests/test_cuda.py::test_c

3 tests collected
"""


def test_test_table_from_junit_and_from_a_stopped_run(tmp_path):
    (tmp_path / "cuda.xml").write_text(JUNIT)
    (tmp_path / "collected.txt").write_text(COLLECTED)
    (tmp_path / "tests.log").write_text(STOPPED_LOG)
    args = ["tests", "--log", str(tmp_path / "tests.log"), "--collected", str(tmp_path / "collected.txt")]
    assert bench_gpu.main(args + ["--junit", str(tmp_path / "cuda.xml"), "--out", str(tmp_path / "a.md")]) == 0
    table = (tmp_path / "a.md").read_text()
    assert "1 passed, 1 FAILED, 1 skipped (from the junit file)" in table
    assert "| test_cuda::test_a[fp16] | passed | 1.5 |  |" in table
    assert "| test_cuda::test_b | FAILED | 0.2 | assert 1 == 2 / x |" in table
    assert "| test_cuda::test_c | skipped | 0.0 | needs two GPUs |" in table
    # no junit file: the run was stopped; what it did not reach is named
    assert bench_gpu.main(args + ["--junit", str(tmp_path / "none.xml"), "--out", str(tmp_path / "b.md")]) == 0
    table = (tmp_path / "b.md").read_text()
    assert "1 passed, 1 FAILED, 1 not run (time) (from the pytest log" in table
    assert "| test_cuda::test_c | not run (time) |" in table


@pytest.mark.slow
def test_whole_dry_run(tmp_path):
    """The whole script on the CPU with this interpreter: every step ok, the cuda tests skipped."""
    report = tmp_path / "report.md"
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--python", sys.executable, str(report)],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = report.read_text()
    for step in ("machine", "collect", "tests", "test-table", "bench"):
        assert f"| {step} | ok |" in text, step
    assert "FAILED" not in text and "ERROR" not in text and " skipped (from the junit file)" in text
    assert "## What this dry run leaves to a GPU" in text

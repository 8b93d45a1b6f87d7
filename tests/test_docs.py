"""Every example of README.md and docs/*.md runs, so none can go stale.

Each fenced block in ``bash``, ``sh``, ``shell`` or ``python`` is run in a subprocess from the
repository root (bash: ``bash -e -o pipefail``; python: ``python -c``), with a timeout; a failure
names the block's file and line and shows the code as it ran and its output. While a test waits
for its block, the next block already runs beside it (:class:`OneAhead`). Output listings are
fenced as ``text`` and not run; every fence must name its language.

The examples name real datasets and checkpoints; here they run on tiny stand-ins, by the
substitutions of :data:`SUBSTITUTIONS` (applied in order to the block's text) and the options of
:data:`APPENDED` (added at the end of every command line that runs that program, where the last
value of an option wins):

* ``DVT_T2t_vit_12.pth.tar`` (and the other released files): a ``DVT_tiny`` with 3 classes at
  224 px in the released layout, thresholds fitted by ``inference.py --eval_mode 2``;
* the released model names: ``DVT_tiny`` (config file names stay), ``num_classes=1000``: 3;
* ``/path/to/imagenet``: the ``image_data`` ImageFolder (3 classes); ``/path/to/cifar``: fake
  CIFAR-10 and CIFAR-100 files; ``photos/``: a folder of a few images;
* what a block writes (``output/``, ``preds.csv``, ...): the same names in a temporary folder of
  the block's own, so nothing is written into the repository;
* ``--nproc_per_node=8``: one process (gloo on the CPU);
* training: one epoch of ``DVT_tiny`` in batches of 4, on the CPU.

A block that cannot run here (several nodes, a cluster, the network) is preceded by
``<!-- not-run: REASON -->`` and skipped with that reason. Blocks that launch torchrun, compile or
export (:data:`SLOW`), and those preceded by ``<!-- slow: REASON -->``, are marked ``slow`` (and
run alone); the rest takes about a minute and a half on 2 cores.
"""
from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fake_data import make_fake_cifar

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_LANGUAGES = {"bash", "sh", "shell", "python"}

SUBSTITUTIONS: list[tuple[str, str]] = [
    (r"\bDVT_(?:T2t_vit_1[24]|Deit_small)\.pth\.tar\b", "{checkpoint}"),
    (r"\bDVT_(?:T2t_vit_1[24]|Deit_small)\b(?![_.])", "DVT_tiny"),
    (r"\bnum_classes=1000\b", "num_classes=3"),
    (r"/path/to/imagenet\b", "{imagenet}"),
    (r"/path/to/cifar\b", "{cifar}"),
    (r"(?<![\w/.])photos/", "{photos}/"),
    (r"(?<![\w/.])(output/|preds\.csv|preds\.jsonl|exits\.png)", r"{out}/\1"),
    (r"--nproc_per_node=8\b", "--nproc_per_node=1"),
]
APPENDED: dict[str, str] = {
    "main.py": "--model DVT_tiny --epochs 1 --cooldown-epochs 0 --warmup-epochs 0 --batch-size 4 --workers 0 "
               "--calib-size 16 --device cpu --no-progress --output {out}/output",
    "inference.py": "--workers 0 --device cpu --no_progress",
    "scripts/visualize_exits.py": "--workers 0",
    "scripts/export_stages.py": "--device cpu",
    "scripts/demo.sh": "--quick --output {out}/output/demo --data {out}/data/demo_shapes",
}
ENV = {"OMP_NUM_THREADS": "1", "DVT_DEMO_SKIP_INSTALL": "1", "MPLBACKEND": "Agg"}
SLOW = re.compile(r"torchrun|torch\.distributed\.launch|--compile\b|CompiledCascade|export_stages")
TIMEOUT_S = 180
SLOW_TIMEOUT_S = 900

FENCE = re.compile(r"^ {0,3}(?P<fence>```+|~~~+)\s*(?P<info>[^`\s]*)")
MARKER = re.compile(r"^\s*<!--\s*(?P<kind>not-run|slow)\s*:?(?P<reason>.*?)-->\s*$")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    marker: str | None  # "not-run" or "slow": the HTML comment on the line before the fence
    reason: str  # the marker's reason

    @property
    def not_run(self) -> bool:
        return self.marker == "not-run"

    @property
    def slow(self) -> bool:
        return self.marker == "slow" or bool(SLOW.search(self.code))

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def fenced_blocks(page: Path) -> list[Block]:
    """Every fenced block of a markdown page, with the marker on the line before it (blank lines
    between them allowed)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence = opening["fence"]
        end = next((j for j in range(i + 1, len(lines))
                    if lines[j].strip().startswith(fence[0] * len(fence)) and not lines[j].strip().strip(fence[0])),
                   len(lines))
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(before)
        blocks.append(Block(page, i + 1, opening["info"].lower(), "\n".join(lines[i + 1:end]) + "\n",
                            marker["kind"] if marker else None, marker["reason"].strip() if marker else ""))
        i = end + 1
    return blocks


ALL_BLOCKS = [b for page in PAGES for b in fenced_blocks(page)]
RUNNABLE = [b for b in ALL_BLOCKS if b.language in RUN_LANGUAGES]


def _param(block: Block):
    if block.not_run:
        return pytest.param(block, id=block.where, marks=pytest.mark.skip(reason=f"not-run: {block.reason}"))
    return pytest.param(block, id=block.where, marks=[pytest.mark.slow] if block.slow else [])


# --------------------------------------------------------------------------- stand-ins

@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory, image_data, one_thread) -> dict[str, str]:
    """The tiny datasets, checkpoint and images the substitutions point to."""
    import inference
    import models
    from models.dvt import to_original_state_dict

    root = tmp_path_factory.mktemp("docs")
    cifar = root / "cifar"
    make_fake_cifar(cifar, num_classes=10, train_per_batch=2, test_size=8)
    make_fake_cifar(cifar, num_classes=100, train_per_batch=2, test_size=8)

    photos = root / "photos"
    (photos / "2024").mkdir(parents=True)
    rs = np.random.RandomState(0)
    for name, (w, h) in {"cat.jpg": (48, 40), "dog.png": (40, 56), "2024/IMG_0107.jpg": (64, 48)}.items():
        Image.fromarray(rs.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(photos / name)

    torch.manual_seed(0)
    weights = root / "weights.pth.tar"
    model = models.build_dvt("DVT_tiny", num_classes=3)
    torch.save({"model_state_dict": to_original_state_dict(model.state_dict())}, weights)
    checkpoint = root / "DVT_tiny_released.pth.tar"
    status = inference.main(["--data_url", str(image_data), "--checkpoint_path", str(weights), "--model", "DVT_tiny",
                             "--eval_mode", "2", "--workers", "0", "--device", "cpu", "--no_progress",
                             "--save_checkpoint", str(checkpoint)])
    assert status == 0 and checkpoint.is_file()
    return {"checkpoint": str(checkpoint), "imagenet": str(image_data),
            "cifar": str(cifar), "photos": str(photos)}


# --------------------------------------------------------------------------- running a block

def _command_lines(code: str) -> list[str]:
    """Shell lines with backslash continuations joined."""
    return code.replace("\\\n", " ").splitlines()


def _append_options(line: str, values: dict[str, str]) -> str:
    command, comment = line, ""
    found = re.search(r"\s#", line)
    if found and not line.lstrip().startswith("#"):
        command, comment = line[:found.start()], line[found.start():]
    for program, options in APPENDED.items():
        if re.search(rf"(?:^|\s)(?:\./)?{re.escape(program)}(?=\s|$)", command):
            return f"{command.rstrip()} {options.format(**values)}{comment}"
    return line


def as_run(block: Block, values: dict[str, str]) -> str:
    """The block's text with the stand-ins put in."""
    code = block.code
    for pattern, replacement in SUBSTITUTIONS:
        code = re.sub(pattern, replacement.format(**values), code)
    if block.language != "python":
        code = "\n".join(_append_options(line, values) for line in _command_lines(code)) + "\n"
    return code


def start_block(code: str, language: str) -> subprocess.Popen:
    """The block's process, its output (stdout and stderr) going to a file, so that a process
    nobody reads yet never blocks on a full pipe."""
    env = {**os.environ, **ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [sys.executable, "-c", code] if language == "python" else ["bash", "-e", "-o", "pipefail", "-c", code]
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    proc.log = log
    return proc


def finish_block(proc: subprocess.Popen, timeout: float) -> tuple[int | None, str]:
    """Exit status (None after the timeout, the process group killed) and the combined output."""
    try:
        status = proc.wait(timeout=max(timeout, 0.1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun's workers too
        proc.wait()
        status = None
    proc.log.seek(0)
    out = proc.log.read()
    proc.log.close()
    return status, out


def run_block(code: str, language: str, timeout: float) -> tuple[int | None, str]:
    """Exit status (None after the timeout) and the combined output."""
    return finish_block(start_block(code, language), timeout)


class OneAhead:
    """Runs the blocks of this session's tests in their order, one ahead: while a test waits for
    its block, the next block's process runs beside it (each on one thread: on 2 cores the docs'
    blocks take about half the time). A block asked for out of order starts then."""

    def __init__(self, blocks: list[Block], values: dict[str, str], tmp_path_factory) -> None:
        self.order, self.values, self.tmp = [b.where for b in blocks], values, tmp_path_factory
        self.blocks = {b.where: b for b in blocks}
        self.running: dict[str, tuple[str, subprocess.Popen, float]] = {}
        self.done: set[str] = set()

    def _start(self, block: Block) -> None:
        code = as_run(block, {**self.values, "out": str(self.tmp.mktemp("block"))})
        self.running[block.where] = (code, start_block(code, block.language), time.monotonic())

    def result(self, block: Block, timeout: float) -> tuple[str, int | None, str]:
        """The block's code as run, its exit status (None after ``timeout`` s from its start) and output."""
        if block.where not in self.running:
            self._start(block)
        self.done.add(block.where)
        ahead = next((w for w in self.order[self.order.index(block.where) + 1:] if w not in self.done), None)
        if ahead is not None and ahead not in self.running:
            self._start(self.blocks[ahead])
        code, proc, started = self.running.pop(block.where)
        return (code, *finish_block(proc, started + timeout - time.monotonic()))

    def close(self) -> None:
        for _, proc, _ in self.running.values():  # started ahead for a test that did not run (-x)
            finish_block(proc, 0)


@pytest.fixture(scope="module")
def blocks_ahead(request, stand_ins, tmp_path_factory):
    """:class:`OneAhead` over the blocks this session runs (not those skipped or deselected)."""
    selected = [item.callspec.params["block"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_block_runs" and item.module is request.module]
    runner = OneAhead([b for b in selected if not b.not_run and not missing_extras(b.code) and not b.slow],
                      stand_ins, tmp_path_factory)
    yield runner
    runner.close()


# Blocks that use the optional extras of requirements-deploy.txt, and the packages they need: they
# run where those are installed (.ci/run installs them) and are skipped, with the reason, elsewhere.
EXTRAS = ((re.compile(r"--tensorboard\b"), ("tensorboard",)),
          (re.compile(r"export_onnx|onnxruntime|from_onnx"), ("onnx", "onnxscript", "onnxruntime")))


def missing_extras(code: str) -> list[str]:
    """The optional packages a block needs that this environment lacks."""
    return [name for pattern, names in EXTRAS if pattern.search(code)
            for name in names if importlib.util.find_spec(name) is None]


@pytest.mark.parametrize("block", [_param(b) for b in RUNNABLE])
def test_block_runs(block: Block, stand_ins, blocks_ahead, tmp_path):
    missing = missing_extras(block.code)
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (pip install -r requirements-deploy.txt)")
    if block.slow:  # alone: torchrun, compilation and export use both cores
        code = as_run(block, {**stand_ins, "out": str(tmp_path)})
        timeout = SLOW_TIMEOUT_S
        status, out = run_block(code, block.language, timeout)
    else:
        timeout = TIMEOUT_S
        code, status, out = blocks_ahead.result(block, timeout)
    if status != 0:
        what = f"timed out after {timeout} s" if status is None else f"exit status {status}"
        pytest.fail(f"{block.where}: {block.language} block, {what}\n--- as run ---\n{code}--- output (end) ---\n"
                    f"{out[-6000:]}", pytrace=False)


# --------------------------------------------------------------------------- the pages themselves

def test_pages_have_runnable_examples():
    assert (ROOT / "docs").is_dir() and len(PAGES) > 1
    assert len([b for b in RUNNABLE if not b.not_run and not b.slow]) >= 10


def test_every_fence_names_its_language():
    bare = [b.where for b in ALL_BLOCKS if not b.language]
    assert not bare, f"fenced blocks without a language (use text for output listings): {bare}"


def test_every_skipped_or_slow_block_says_why():
    unexplained = [b.where for b in ALL_BLOCKS if b.marker and not b.reason]
    assert not unexplained, f"<!-- not-run: REASON --> and <!-- slow: REASON --> need a reason: {unexplained}"
    stray = [b.where for b in ALL_BLOCKS if b.marker and b.language not in RUN_LANGUAGES]
    assert not stray, f"markers before blocks that never run: {stray}"


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
    return {re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            for m in re.finditer(r"^#{1,6}\s+(.+)$", text, flags=re.MULTILINE)}


def test_links_between_pages_resolve():
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists() or (anchor and dest.is_file() and anchor not in _anchors(dest)):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken

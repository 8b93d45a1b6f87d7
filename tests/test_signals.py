"""Signals: SIGTERM during the dataset scan stops it at once, SIGTERM during the release export
stops the export cleanly, and Ctrl-C in inference.py with loader workers prints one line."""
from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from fake_data import make_image_folder
from helpers import REPO, SUBPROCESS_ENV, child_pids, quick_args, run_main
from utils.checkpoint.files import load_checkpoint_file

pytestmark = pytest.mark.usefixtures("one_thread")


def test_progress_bars_start_no_thread():
    """A plain tqdm bar starts tqdm's monitor thread; made just before a loader forks its workers,
    that thread can leave a worker locked inside ``os.fork`` on Python 3.11 (a two-process training
    run hung so, its worker waiting for the interpreter's thread-list lock). The project's bars
    start no thread, shown or not; a plain bar in the same fresh interpreter does."""
    code = ("import threading\n"
            "from tqdm._monitor import TMonitor\n"
            "from tqdm.auto import tqdm\n"
            "from utils.run.progress import ProgressBar\n"
            "def monitors(): return sum(isinstance(t, TMonitor) for t in threading.enumerate())\n"
            "for disable in (True, False):\n"
            "    for _ in ProgressBar(range(3), disable=disable): pass\n"
            "mine = monitors()\n"
            "bar = tqdm(range(3), disable=True)\n"
            "print(mine, monitors())\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.split() == ["0", "1"], out.stdout + out.stderr


def test_a_bar_iterates_what_it_wraps_once(monkeypatch):
    """A bar made over a DataLoader and then read calls ``iter()`` on it once: each call starts
    a set of workers (a second one was started and never read while the bars came from
    ``tqdm.auto``). Shown or not."""
    from utils.run.progress import ProgressBar

    class Counted:
        calls = 0

        def __iter__(self):
            Counted.calls += 1
            return iter(range(3))

        def __len__(self):
            return 3

    for disable in (True, False):
        Counted.calls = 0
        assert list(ProgressBar(Counted(), disable=disable, file=io.StringIO())) == [0, 1, 2]
        assert Counted.calls == 1, disable
    worker_sets = []
    start_workers = torch.utils.data.dataloader._MultiProcessingDataLoaderIter.__init__

    def counted(self, loader):
        worker_sets.append(loader)
        start_workers(self, loader)

    monkeypatch.setattr(torch.utils.data.dataloader._MultiProcessingDataLoaderIter, "__init__", counted)
    loader = torch.utils.data.DataLoader(range(4), batch_size=2, num_workers=1)
    assert [b.tolist() for b in ProgressBar(loader, disable=True)] == [[0, 1], [2, 3]]
    assert len(worker_sets) == 1


def test_a_bar_an_exception_left_open_is_cleared_before_the_message():
    """Ctrl-C while a bar iterated inside a generator is on screen: the generator (and so the bar)
    outlives the exception's message, kept by its traceback, and the bar's half line took the
    message (``[00:00<16:16, 2.46it/s]interrupted``). bars_cleared_on_error clears it first."""
    from utils.run.progress import ProgressBar, bars_cleared_on_error

    def batches(stream):
        yield from ProgressBar(range(10), file=stream, leave=False, mininterval=0, desc="predict")

    for cleared in (False, True):
        stream = _Terminal()
        try:
            with bars_cleared_on_error() if cleared else contextlib.nullcontext():
                running = batches(stream)  # a local, as in the loops that read batches
                for i in running:
                    if i == 2:
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            print("interrupted", file=stream)
        lines = [part.strip() for part in re.split(r"[\r\n]", stream.getvalue()) if part.strip()]
        assert (lines[-1] == "interrupted") == cleared, (cleared, stream.getvalue())
        del running


class _Terminal(io.StringIO):
    """What a bar writes to a terminal."""

    def isatty(self) -> bool:
        return True


def test_a_bar_in_a_log_writes_a_line_a_minute_and_a_terminal_keeps_its_bar(monkeypatch):
    """A SLURM log or a pipe keeps a terminal bar's redraws (carriage returns, several a second)
    as one line growing by thousands of copies. Off a terminal a bar writes plain lines instead, at
    most one per minute (``DVT_PROGRESS_INTERVAL`` seconds when set), none in a shorter run; on a
    terminal it is tqdm's bar."""
    from utils.run.progress import ProgressBar

    log = io.StringIO()
    for _ in ProgressBar(range(50), desc="val", file=log, leave=False):
        time.sleep(0.002)
    assert log.getvalue() == ""
    monkeypatch.setenv("DVT_PROGRESS_INTERVAL", "0")
    for _ in ProgressBar(range(3), desc="val", file=log, leave=False):
        time.sleep(0.002)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) >= 3, log.getvalue()
    assert re.fullmatch(r"val: 3/3 \(100%\), 00:00 elapsed, 00:00 left, [\d.]+it/s", lines[-1]), lines
    streamed = io.StringIO()  # no total: a stream of images
    bar = ProgressBar(unit="img", desc="predict", file=streamed, leave=False)
    bar.update(16)
    bar.close()
    assert re.fullmatch(r"predict: 16 img, 00:00 elapsed, [\d.]+img/s", streamed.getvalue().splitlines()[-1])
    monkeypatch.setenv("DVT_PROGRESS_INTERVAL", "soon")
    with pytest.warns(UserWarning, match="DVT_PROGRESS_INTERVAL='soon' is not a number of seconds"):
        bar = ProgressBar(range(3), file=io.StringIO())
    assert bar.mininterval == 60
    terminal = _Terminal()
    for _ in ProgressBar(range(3), desc="val", file=terminal, mininterval=0, leave=False):
        pass
    assert "\r" in terminal.getvalue() and "| 3/3 [" in terminal.getvalue()


class _StuckAfterFirst(torch.utils.data.Dataset):
    """Sample 0 at once; any other never returns (a worker stuck in a sample)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        if i:
            time.sleep(3600)
        return torch.zeros(1)


@pytest.mark.parametrize("persistent", [True, False])
def test_close_loaders_ends_a_worker_stuck_in_a_sample(monkeypatch, persistent):
    """The workers ignore SIGTERM, so one busy in a sample that never returns outlives torch's
    shutdown (which ends with SIGTERM), and the interpreter's exit would wait for it for ever
    after the run's work is done. close_loaders kills it, also for a loader that is not
    persistent, whose iterator is held elsewhere (in a run, by the traceback of the generator
    that read it), even when the loader itself is gone."""
    import gc

    from torch.utils.data import _utils as loader_utils

    from utils.data.loader import close_loaders, make_loader
    loader = make_loader(_StuckAfterFirst(), None, batch_size=1, workers=1, persistent=persistent)
    iterator = iter(loader)
    assert next(iterator).shape == (1, 1)
    assert (loader._iterator is iterator) == persistent
    worker = iterator._workers[0]  # now in sample 1, fetched ahead
    if not persistent:
        del loader
        gc.collect()
    # torch's shutdown waits this long for the worker twice (before and after its SIGTERM): 5 s each
    monkeypatch.setattr(loader_utils, "MP_STATUS_CHECK_INTERVAL", 0.5)
    try:
        close_loaders()
        assert not worker.is_alive()
        if persistent:
            assert loader._iterator is None  # iterated again, it starts new workers
    finally:
        if worker.is_alive():
            worker.kill()
            worker.join()


def test_sigterm_during_the_scan_stops_at_once(small_data, tmp_path, capsys, monkeypatch):
    import utils.data.scan as scan

    real = os.scandir
    calls = []

    def scandir_then_signal(path):
        calls.append(os.fspath(path))
        if calls[-1].endswith(os.path.join("train", "class_0")):  # the first class folder of the listing
            os.kill(os.getpid(), signal.SIGTERM)
        return real(path)

    monkeypatch.setattr(scan.os, "scandir", scandir_then_signal)
    code, out, err = run_main(capsys, quick_args(small_data, tmp_path / "out"))
    monkeypatch.undo()
    assert code == 128 + signal.SIGTERM, err
    assert "SIGTERM" in out + err and "Traceback" not in err
    assert not [c for c in calls if c.endswith("class_1")]  # stopped in the first folder, not at the end
    assert not list((tmp_path / "out").rglob("*.pth.tar"))


def test_sigterm_during_the_release_export_stops_it_cleanly(small_data, tmp_path, capsys, eval_hooks):
    # evaluation forwards: 1 val, 2 val (EMA), 3 the export's first batch
    eval_hooks[3] = lambda: os.kill(os.getpid(), signal.SIGTERM)
    code, out, err = run_main(capsys, quick_args(small_data, tmp_path / "out"))
    run = tmp_path / "out" / "train" / "run"
    assert code == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert "--export-released" in out + err
    assert not (run / "released.pth.tar").exists() and not list(run.glob(".*.tmp"))
    assert load_checkpoint_file(run / "best.pth.tar")["epoch"] == 1


# ------------------------------------------------------------------- Ctrl-C in inference.py

def wait_until(condition, timeout: float = 120.0) -> None:
    """Poll ``condition`` until it holds (the moment is what matters, not a duration)."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "the awaited moment never came"
        time.sleep(0.005)


def read_until(stream, pattern: re.Pattern, seen: list[str]) -> None:
    """Read ``stream`` character by character until ``pattern`` matches what was read."""
    text = ""
    while not pattern.search(text):
        char = stream.read(1)
        assert char, "".join(seen) + text
        text += char
    seen.append(text)


BATCH_DONE = re.compile(r"\b[1-9]\d*/\d+ ")  # the progress bar counts a finished batch


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the loader's workers through /proc")
def test_ctrl_c_in_inference_with_workers_prints_one_line(trained_run, tmp_path):
    data = tmp_path / "many"  # 2,403 validation images: one per class, and 800 links to it
    make_image_folder(data, num_classes=3, train_per_class=1, val_per_class=1, size=32)
    for k in range(3):
        folder = data / "val" / f"class_{k}"
        first = next(folder.glob("*.png"))
        for i in range(800):
            (folder / f"copy{i:03d}.png").symlink_to(first.name)
    # Ctrl-C at three moments: as evaluation starts (the workers are being started), once both
    # workers exist, and once a batch has gone through them. Each command runs in its own process
    # group, signalled as a whole, which is what Ctrl-C in a terminal does.
    moments = ("evaluation starts", "workers exist", "a batch is done")

    def start(moment: str) -> subprocess.Popen:
        progress = [] if moment == "a batch is done" else ["--no_progress"]
        return subprocess.Popen(
            [sys.executable, str(REPO / "inference.py"), "--data_url", str(data), "--checkpoint_path",
             str(trained_run / "released.pth.tar"), "--eval_mode", "1", "--batch_size", "1", "--workers", "2",
             "--device", "cpu", *progress],
            env={**SUBPROCESS_ENV, "DVT_PROGRESS_INTERVAL": "0"},  # a pipe's progress: a line per batch
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)

    def interrupt(moment: str, proc: subprocess.Popen, seen: list[str]) -> None:
        for line in proc.stderr:
            seen.append(line)
            if line.startswith("evaluating"):
                break
        else:
            return
        if moment == "workers exist":
            wait_until(lambda: len(child_pids(proc.pid)) >= 2 or proc.poll() is not None)
        elif moment == "a batch is done":
            read_until(proc.stderr, BATCH_DONE, seen)
        os.killpg(proc.pid, signal.SIGINT)

    watchers = [(moment, start(moment), []) for moment in moments]
    threads = [threading.Thread(target=interrupt, args=w) for w in watchers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    for moment, proc, seen in watchers:
        rest = proc.stderr.read()
        code = proc.wait(timeout=60)
        assert code == 130, f"Ctrl-C when {moment}: " + "".join(seen) + rest
        if moment == "a batch is done":  # the progress bar's last redraws, then the one line
            lines = [part.strip() for part in re.split(r"[\r\n]", rest) if part.strip()]
            assert lines[-1] == "interrupted" and rest.count("interrupted") == 1, f"Ctrl-C when {moment}: {rest!r}"
            assert "Traceback" not in rest and "Error" not in rest, f"Ctrl-C when {moment}: {rest!r}"
        else:
            assert rest.strip() == "interrupted", f"Ctrl-C when {moment}: {rest}"

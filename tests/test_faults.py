"""Faults, end to end on tiny data: each case gives one ``error:`` line (or a clean stop), the
exit status of the documented kind, and leaves what was on disk as it was.

Covered: one run per folder (lock, unique timestamped folders), refused resumes that leave
the run folder byte-identical, class safety in main.py and inference.py, dataset scans that
end (symbolic-link loops, hidden and AppleDouble files) and stop on signals, a full disk
during a checkpoint save, read-only and misnamed outputs, non-finite and duplicated config
values, decompression bombs, damaged checkpoint files, signals during the release export,
checkpoint permissions and Ctrl-C in inference.py with loader workers.
"""
from __future__ import annotations

import contextlib
import errno
import faulthandler
import hashlib
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Iterator

import pytest

import inference
import main as train_main
from fake_data import make_image_folder
from models.dvt import DVT
from utils.checkpoint.files import atomic_save, load_checkpoint_file
from utils.run.folder import RUN_LOCK, RunLock, RunLockedError

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny_cpu.yaml")
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """3 classes, 24 training and 6 validation images of 32x32."""
    return make_image_folder(tmp_path_factory.mktemp("faults") / "data", num_classes=3, train_per_class=8,
                             val_per_class=2, size=32)


def args_for(data: Path, out: Path, *extra: str, experiment: str | None = "run") -> list[str]:
    argv = [str(data), "--config", TINY, "--device", "cpu", "--output", str(out), "--epochs", "1",
            "--calib-size", "8", "--log-interval", "0", "--no-progress"]
    if experiment:
        argv += ["--experiment", experiment]
    return argv + list(extra)


def copy_data(data: Path, dest: Path) -> Path:
    shutil.copytree(data, dest)
    return dest


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and folder under ``root``: content hash, size, mode and mtime."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        digest = hashlib.sha1(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        out[str(path.relative_to(root))] = (digest, st.st_size, st.st_mode, st.st_mtime_ns)
    return out


def error_line(err: str) -> str:
    """The one ``error:`` line of a failed command, with no traceback around it."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


def run_main(capsys, argv: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = train_main.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def run_inference(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = inference.main([str(a) for a in argv] + ["--no_progress", "--workers", "0", "--device", "cpu"])
    out, err = capsys.readouterr()
    return code, out, err


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail (dump the stacks and exit) instead of hanging when the body runs for ever."""
    faulthandler.dump_traceback_later(seconds, exit=True, file=sys.__stderr__)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    """A finished one-epoch run (with released.pth.tar), written under umask 027."""
    out = tmp_path_factory.mktemp("trained")
    old = os.umask(0o027)
    try:
        assert train_main.main(args_for(data, out)) == 0
    finally:
        os.umask(old)
    return out / "train" / "run"


def copy_run(trained: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the finished run: (output base, run folder)."""
    out = tmp_path / "out"
    shutil.copytree(trained, out / "train" / "run")
    return out, out / "train" / "run"


# ----------------------------------------------------------------------------- mounts

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


# --------------------------------------------------------------------- one run a folder

HOLD_LOCK = ("import sys, time; sys.path.insert(0, sys.argv[1]); from utils.run.folder import RunLock; "
             "lock = RunLock(sys.argv[2]).acquire(); print('locked', flush=True); time.sleep(60)")


def test_a_held_run_folder_is_refused_and_the_lock_dies_with_its_holder(data, tmp_path, capsys):
    folder = tmp_path / "out" / "train" / "run"
    folder.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(REPO), str(folder)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(tmp_path / "out")
        code, _, err = run_main(capsys, args_for(data, tmp_path / "out"))
        line = error_line(err)
        assert code in (1, 2)
        assert "in use by another run" in line and f"pid {holder.pid}" in line and "host " in line, line
        assert snapshot(tmp_path / "out") == before  # no config.yaml, log.txt or checkpoint of the refused run
    finally:
        holder.kill()  # kill -9: the kernel releases the flock with the process
        holder.wait()
    with RunLock(folder) as lock:
        assert lock.held
        with pytest.raises(RunLockedError):
            RunLock(folder).acquire()
    assert (folder / RUN_LOCK).is_file()


def test_timestamped_run_folders_never_collide(tmp_path):
    from utils.run.folder import create_unique_folder

    made = [create_unique_folder(tmp_path / "train", "20260101-000000-DVT_tiny-32") for _ in range(3)]
    assert len(set(made)) == 3 and all(p.is_dir() for p in made)
    assert made[0].name == "20260101-000000-DVT_tiny-32"


@pytest.mark.slow
def test_two_runs_started_together_into_one_folder(data, tmp_path):
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, str(REPO / "main.py"), *args_for(data, out, "--seed", str(seed),
                                                                                "--no-release")],
                              env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (1, 2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0 and codes[1] in (1, 2), results
    loser = next(err for code, err in results if code != 0)
    assert "in use by another run" in error_line(loser) or "already holds a run" in error_line(loser)
    saved = load_checkpoint_file(out / "train" / "run" / "last.pth.tar")
    winner_seed = saved["config"]["seed"]
    assert f"seed: {winner_seed}" in (out / "train" / "run" / "config.yaml").read_text()


# ------------------------------------------------------------------------ refused resumes

def make_refused_resume(case: str, run: Path, tmp_path: Path, data: Path) -> tuple[list[str], str, Path]:
    """(extra argv, expected message part, dataset) of a --resume main.py must refuse."""
    last = run / "last.pth.tar"
    if case == "released file":
        return ["--resume", str(run / "released.pth.tar")], "released checkpoint", data
    if case == "missing file":
        return ["--resume", str(run / "nope.pth.tar")], "not found", data
    if case == "a folder":
        return ["--resume", str(run)], str(run), data
    if case == "zero bytes":
        (tmp_path / "zero.pth.tar").write_bytes(b"")
        return ["--resume", str(tmp_path / "zero.pth.tar")], "empty (0 bytes)", data
    if case == "text file":
        (tmp_path / "notes.pth.tar").write_text("epoch 3: loss 1.2\n")
        return ["--resume", str(tmp_path / "notes.pth.tar")], "text file", data
    if case == "another model":
        return ["--resume", str(last), "--model", "DVT_Deit_small"], "DVT_tiny checkpoint", data
    if case == "another image size":
        return ["--resume", str(last), "--img-size", "48"], "--img-size 32", data
    if case == "more classes":
        four = make_image_folder(tmp_path / "four", num_classes=4, train_per_class=2, val_per_class=1, size=32)
        return ["--resume", str(last)], "classes", four
    if case == "best behind last":
        best = load_checkpoint_file(last)
        best["num_updates"] -= 1
        atomic_save(best, run / "best.pth.tar")
        return ["--resume", str(run / "best.pth.tar")], "behind", data
    raise ValueError(case)


@pytest.mark.parametrize("case", ["released file", "missing file", "a folder", "zero bytes", "text file",
                                  "another model", "another image size", "more classes", "best behind last"])
def test_refused_resume_changes_nothing(case, trained, data, tmp_path, capsys):
    out, run = copy_run(trained, tmp_path)
    extra, expected, dataset = make_refused_resume(case, run, tmp_path, data)
    before = snapshot(out)
    code, _, err = run_main(capsys, args_for(dataset, out, *extra, experiment=None))
    line = error_line(err)
    assert code in (1, 2) and expected in line, line
    assert snapshot(out) == before


# --------------------------------------------------------------------------- classes

@pytest.mark.parametrize("change, expected", [
    ("drop", "only in train/: 'class_2'"),
    ("rename", "only in val/: 'renamed'"),
])
def test_train_and_val_classes_must_match(change, expected, data, tmp_path, capsys):
    bad = copy_data(data, tmp_path / "data")
    if change == "drop":
        shutil.rmtree(bad / "val" / "class_2")
    else:
        (bad / "val" / "class_1").rename(bad / "val" / "renamed")
    code, _, err = run_main(capsys, args_for(bad, tmp_path / "out"))
    line = error_line(err)
    assert code == 1 and expected in line, line
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_checkpoints_store_class_names_and_follow_the_umask(trained):
    for name in ("last.pth.tar", "best.pth.tar", "released.pth.tar"):
        checkpoint = load_checkpoint_file(trained / name)
        assert checkpoint["class_names"] == ["class_0", "class_1", "class_2"], name
        assert (trained / name).stat().st_mode & 0o777 == 0o640, name  # written under umask 027
    assert not list(trained.glob(".*.tmp"))


def test_one_class_gives_a_warning(data, tmp_path, capsys):
    one = tmp_path / "one"
    for split in ("train", "val"):
        shutil.copytree(data / split / "class_0", one / split / "class_0")
    code, out, err = run_main(capsys, args_for(one, tmp_path / "out", "--no-release", "--mixup", "0",
                                               "--cutmix", "0"))
    assert code == 0, err
    assert "only 1 class" in out


@pytest.mark.parametrize("change, allowed", [("more classes", False), ("renamed class", True)])
def test_inference_refuses_other_classes(change, allowed, trained, data, tmp_path, capsys):
    bad = copy_data(data, tmp_path / "data")
    if change == "more classes":
        for split in ("train", "val"):
            shutil.copytree(bad / split / "class_0", bad / split / "class_3")
    else:
        for split in ("train", "val"):
            (bad / split / "class_2").rename(bad / split / "zebra")
    common = ["--data_url", bad, "--checkpoint_path", trained / "released.pth.tar", "--eval_mode", "1",
              "--batch_size", "8"]
    code, out, err = run_inference(capsys, *common)
    line = error_line(err)
    expected = "--allow_class_mismatch" if allowed else "more than the model's heads (3)"
    assert code == 1 and "classes" in line and expected in line, line
    assert "flops :" not in out  # refused before evaluating
    code, out, err = run_inference(capsys, *common, "--allow_class_mismatch")
    if allowed:  # the same number of classes: the user may know the labels match
        assert code == 0 and "flops :" in out and "zebra" in err, err
    else:  # labels the heads cannot output: never scored
        assert code == 1 and expected in error_line(err)


# ----------------------------------------------------------------------------- scans

def test_symlink_loop_hidden_and_appledouble_files_are_harmless(data, tmp_path, capsys):
    odd = copy_data(data, tmp_path / "data")
    (odd / "train" / "class_0" / "loop").symlink_to("..")  # train/class_0/loop -> train
    (odd / "train" / "class_1" / "deeper").mkdir()
    (odd / "train" / "class_1" / "deeper" / "up").symlink_to("../..")  # -> train/class_1... -> train
    (odd / "val" / "class_2" / "._0000.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (odd / "val" / "class_2" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    with deadline(120):
        code, out, err = run_main(capsys, args_for(odd, tmp_path / "out", "--no-release"))
    assert code == 0, err
    from utils.data.scan import scan_image_folder

    listed = scan_image_folder(odd / "train", report=None)
    assert len(listed.samples) == 24 and listed.classes == ["class_0", "class_1", "class_2"]
    assert listed.skipped["folders seen before"] == 2


def test_sigterm_during_the_scan_stops_at_once(data, tmp_path, capsys, monkeypatch):
    import utils.data.scan as scan

    real = os.scandir
    calls = []

    def scandir_then_signal(path):
        calls.append(os.fspath(path))
        if calls[-1].endswith(os.path.join("train", "class_0")):  # the first class folder of the listing
            os.kill(os.getpid(), signal.SIGTERM)
        return real(path)

    monkeypatch.setattr(scan.os, "scandir", scandir_then_signal)
    code, out, err = run_main(capsys, args_for(data, tmp_path / "out"))
    monkeypatch.undo()
    assert code == 128 + signal.SIGTERM, err
    assert "SIGTERM" in out + err and "Traceback" not in err
    assert not [c for c in calls if c.endswith("class_1")]  # stopped in the first folder, not at the end
    assert not list((tmp_path / "out").rglob("*.pth.tar"))


# ------------------------------------------------------------------ models with hooks

@pytest.fixture
def eval_hooks(monkeypatch) -> dict:
    """``hooks[n]()`` runs on the n-th evaluation forward of any DVT (validation, EMA
    validation, release export), to fault a run at a chosen point."""
    hooks: dict = {}
    evals = [0]
    forward = DVT.forward

    def hooked(self, x):
        out = forward(self, x)
        if not self.training:
            evals[0] += 1
            hook = hooks.pop(evals[0], None)
            if hook is not None:
                hook()
        return out

    monkeypatch.setattr(DVT, "forward", hooked)
    return hooks


# ------------------------------------------------------------------ disks and folders

def full_disk_writes(monkeypatch) -> None:
    """Without a small tmpfs: from now on, checkpoint writes fail with ENOSPC."""
    real = os.fdopen

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fdopen(fd, mode="r", *args, **kwargs):
        f = real(fd, mode, *args, **kwargs)
        return FullDisk(f) if "w" in mode else f

    monkeypatch.setattr(os, "fdopen", fdopen)


def test_disk_full_during_a_save_keeps_the_last_good_checkpoint(data, tmp_path, capsys, monkeypatch, eval_hooks):
    out = tmp_path / "disk"
    mounted = mount_tmpfs(out, 32 * 2 ** 20)

    def fill_the_disk() -> None:
        if mounted:
            (out / "filler").write_bytes(b"\0" * (shutil.disk_usage(out).free - 2 ** 19))
        else:
            full_disk_writes(monkeypatch)

    eval_hooks[3] = fill_the_disk  # epoch 1's validation: epoch 0 is saved, epoch 1's save will not fit
    try:
        code, _, err = run_main(capsys, args_for(data, out, "--epochs", "2", "--no-release"))
        line = error_line(err)
        assert code == 1 and "No space left on device" in line and "last.pth.tar" in line, line
        run = out / "train" / "run"
        saved = load_checkpoint_file(run / "last.pth.tar")
        assert saved["epoch"] == 1  # epoch 0 done, intact
        rows = (run / "summary.csv").read_text().splitlines()
        assert len(rows) == 2  # header and epoch 0: the row of the failed epoch is not there
        assert not list(run.glob(".*.tmp"))
    finally:
        if mounted:
            umount(out)


def test_too_little_free_space_is_refused_before_the_run(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "small"
    mounted = mount_tmpfs(out, 2 ** 20)
    if not mounted:
        import shutil as sh

        usage = sh.disk_usage(tmp_path)
        monkeypatch.setattr(sh, "disk_usage", lambda p: usage._replace(free=2 ** 20))
    try:
        code, _, err = run_main(capsys, args_for(data, out))
        line = error_line(err)
        assert code == 2 and "MiB free" in line, line
        assert not any(out.iterdir())
    finally:
        if mounted:
            umount(out)


def test_read_only_output_is_refused_before_the_run(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ro"
    mounted = mount_tmpfs(out, 2 ** 20, read_only=True)
    if not mounted:  # root writes through permission bits: refuse the access check instead
        import utils.run.preflight

        monkeypatch.setattr(utils.run.preflight.os, "access", lambda path, mode: False)
    try:
        code, _, err = run_main(capsys, args_for(data, out / "runs"))
        line = error_line(err)
        assert code == 2 and "cannot write in" in line and str(out) in line, line
        assert "read-only" in line or not mounted
    finally:
        if mounted:
            umount(out)


def test_output_naming_a_file(data, tmp_path, capsys, trained):
    target = tmp_path / "results.txt"
    target.write_text("keep me\n")
    code, _, err = run_main(capsys, args_for(data, target))
    assert code == 2 and "is a file" in error_line(err)
    assert target.read_text() == "keep me\n"
    code, _, err = run_inference(capsys, "--data_url", data, "--checkpoint_path", trained / "released.pth.tar",
                                 "--eval_mode", "1", "--output", target)
    assert code == 1 and "is a file" in error_line(err)
    assert "evaluating" not in err  # found before the work


# ---------------------------------------------------------------------------- configs

@pytest.mark.parametrize("text, flags, expected", [
    ("lr: .nan\n", [], "--lr nan is not a finite number"),
    ("", ["--weight-decay", "inf"], "--weight-decay inf is not a finite number"),
    ("lr: 1.0e-3\nepochs: 2\nlr: 2.0e-3\n", [], "key 'lr' is set twice (lines 1 and 3)"),
])
def test_bad_config_values(text, flags, expected, data, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    code, _, err = run_main(capsys, args_for(data, tmp_path / "out", "--config", str(cfg), *flags))
    line = error_line(err)
    assert code == 2 and expected in line, line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- images

def bomb_png(path: Path, side: int = 40000) -> None:
    """A valid PNG header announcing side x side pixels (far above Pillow's limit) in a few bytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
                     + chunk(b"IEND", b""))


def test_decompression_bomb_is_named_before_training(data, tmp_path, capsys, trained):
    bad = copy_data(data, tmp_path / "data")
    bomb = bad / "val" / "class_1" / "huge.png"
    bomb_png(bomb)
    code, out, err = run_main(capsys, args_for(bad, tmp_path / "out"))
    line = error_line(err)
    assert code == 1 and str(bomb) in line and "pixels" in line, line
    assert not list((tmp_path / "out").rglob("*.pth.tar"))  # before the first epoch
    code, out, err = run_inference(capsys, "--data_url", bad, "--checkpoint_path", trained / "released.pth.tar",
                                   "--eval_mode", "1", "--batch_size", "8")
    line = error_line(err)
    assert code == 1 and str(bomb) in line, line


# ------------------------------------------------------------------------ signals

def test_sigterm_during_the_release_export_stops_it_cleanly(data, tmp_path, capsys, eval_hooks):
    # evaluation forwards: 1 val, 2 val (EMA), 3 the export's first batch
    eval_hooks[3] = lambda: os.kill(os.getpid(), signal.SIGTERM)
    code, out, err = run_main(capsys, args_for(data, tmp_path / "out"))
    run = tmp_path / "out" / "train" / "run"
    assert code == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert "--export-released" in out + err
    assert not (run / "released.pth.tar").exists() and not list(run.glob(".*.tmp"))
    assert load_checkpoint_file(run / "best.pth.tar")["epoch"] == 1


def test_ctrl_c_in_inference_with_workers_prints_one_line(trained, tmp_path):
    data = tmp_path / "many"  # 2,400 validation images: one per class, linked 800 times
    make_image_folder(data, num_classes=3, train_per_class=1, val_per_class=1, size=32)
    for k in range(3):
        folder = data / "val" / f"class_{k}"
        first = next(folder.glob("*.png"))
        for i in range(800):
            (folder / f"copy{i:03d}.png").symlink_to(first.name)
    # Ctrl-C while the loader workers start and once they run; each command in its own process
    # group, signalled as a whole, which is what Ctrl-C in a terminal does
    procs = [(delay, subprocess.Popen(
        [sys.executable, str(REPO / "inference.py"), "--data_url", str(data), "--checkpoint_path",
         str(trained / "released.pth.tar"), "--eval_mode", "1", "--batch_size", "1", "--workers", "2",
         "--no_progress", "--device", "cpu"],
        env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True))
        for delay in (0.05, 0.2, 1.0)]
    def interrupt(delay: float, proc: subprocess.Popen, seen: list[str]) -> None:
        for line in proc.stderr:
            seen.append(line)
            if line.startswith("evaluating"):
                time.sleep(delay)
                os.killpg(proc.pid, signal.SIGINT)
                break

    watchers = [(delay, proc, []) for delay, proc in procs]
    threads = [threading.Thread(target=interrupt, args=w) for w in watchers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for delay, proc, seen in watchers:
        rest = proc.stderr.read()
        code = proc.wait(timeout=60)
        assert code == 130, f"Ctrl-C {delay} s after the start: " + "".join(seen) + rest
        assert rest.strip() == "interrupted", f"Ctrl-C {delay} s after the start: {rest}"

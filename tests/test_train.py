"""Training: the original command line, distributed runs (torchrun and the legacy launcher),
exact resume after SIGTERM/SIGINT, mixed precision, clean errors, CIFAR fine-tuning and the
released-format export read by inference.py."""
from __future__ import annotations

import os
import signal
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import torchvision
from timm.models import register_model

import inference
import main as train_main
from fake_data import make_fake_cifar
from helpers import REPO, SUBPROCESS_ENV, TINY, cpu_amp_dtype, printed_results, read_summary
from helpers import free_port  # noqa: F401  (test_cuda.py imports it from here)
from models.dvt import DVT, to_original_state_dict
from models.registry import MODEL_CFGS
from utils import precision
from utils.checkpoint.files import atomic_save, load_checkpoint_file
from utils.data.cifar import CIFAR10Files, CIFAR100Files, load_cifar
from utils.data.loader import EpochSampler, SeededDataset
from utils.run.config import resolved_config
from utils.run.train_options import check_args, parse_args

FAULTS: dict[str, int] = {}


class FaultyDVT(DVT):
    """DVT_tiny that, on its n-th training (or evaluation) forward, sends itself SIGTERM or
    SIGINT or returns NaN logits, as set in ``FAULTS``."""
    calls = {"train": 0, "eval": 0}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = super().forward(x)
        mode = "train" if self.training else "eval"
        FaultyDVT.calls[mode] += 1
        n = FaultyDVT.calls[mode]
        if mode == "train" and FAULTS.get("nan_at") == n:
            out = tuple(o * float("nan") for o in out)
        if FAULTS.get(f"signal_{mode}_at") == n:
            os.kill(os.getpid(), FAULTS.get("signal", signal.SIGTERM))
        return out


@register_model
def DVT_tiny_faulty(pretrained: bool = False, **kwargs) -> DVT:
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    model = FaultyDVT(**{**MODEL_CFGS["DVT_tiny"], **kwargs})
    model.model_name, model.model_kwargs = "DVT_tiny", dict(kwargs)
    return model


def set_faults(**faults: int) -> None:
    FAULTS.clear()
    FAULTS.update(faults)
    FaultyDVT.calls.update(train=0, eval=0)


@pytest.fixture(autouse=True)
def one_thread():
    """Two threads on two shared cores make tiny matrix products a hundred times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    set_faults()
    yield
    torch.set_num_threads(threads)
    set_faults()


def base_args(data: Path, out: Path, name: str, *extra: str) -> list[str]:
    return [str(data), "--config", TINY, "--device", "cpu", "--output", str(out), "--experiment", name,
            "--log-interval", "1", *extra]


def run_dir(out: Path, name: str) -> Path:
    return out / "train" / name


def tensors_equal(a, b) -> bool:
    """Nested containers of tensors and numbers compare bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b))
    return a == b


def assert_same_training_state(a: dict, b: dict) -> None:
    for key in ("model", "model_ema", "optimizer", "scheduler", "epoch", "step", "num_updates", "best_metric"):
        assert tensors_equal(a[key], b[key]), f"'{key}' differs"


def check_released_with_inference(path: Path, data: Path, capsys) -> None:
    """inference.py --eval_mode 0 prints the stored numbers; --eval_mode 1 recomputes them from
    the stored thresholds (per-sample confidences may differ in the last bit with the batch
    composition, which can move a sample across a threshold: the curve is compared loosely)."""
    stored = load_checkpoint_file(path)
    capsys.readouterr()
    assert inference.main(["--data_url", str(data), "--batch_size", "8", "--checkpoint_path", str(path),
                           "--eval_mode", "0"]) == 0
    mode0 = printed_results(capsys.readouterr().out)
    assert mode0 == {k: stored[k] for k in mode0}
    assert inference.main(["--data_url", str(data), "--batch_size", "8", "--checkpoint_path", str(path),
                           "--eval_mode", "1", "--workers", "0", "--no_progress"]) == 0
    mode1 = printed_results(capsys.readouterr().out)
    assert mode1["flops"] == mode0["flops"]
    assert mode1["anytime_classification"] == mode0["anytime_classification"]
    gflops, top1 = mode1["budgeted_batch_classification"]
    assert len(gflops) == len(top1) == 59 == stored["dynamic_threshold"].shape[0]
    per_image = 100.0 / len(list((data / "val").rglob("*.png")))  # top-1 points of one validation image
    assert max(abs(a - b) for a, b in zip(top1, stored["budgeted_batch_classification"][1])) <= 2 * per_image + 1e-6


# ------------------------------------------------------------------------ command line

ORIGINAL = ["PATH", "--model", "DVT_T2t_vit_12", "--b", "128", "--lr", "2e-3", "--weight-decay", ".03", "--amp",
            "--img-size", "224"]


def test_original_command_line_parses():
    # --b would be ambiguous by prefix (the original parser also has --bn-*); it is an explicit alias here
    args = parse_args(ORIGINAL + ["--local-rank=3"])
    assert (args.data, args.model, args.batch_size, args.lr, args.weight_decay, args.amp, args.img_size) == \
        ("PATH", "DVT_T2t_vit_12", 128, 2e-3, .03, True, 224)
    assert args.local_rank == 3
    assert parse_args(ORIGINAL + ["--local_rank", "1"]).local_rank == 1
    assert parse_args(["PATH", "-b", "7"]).batch_size == 7
    args = parse_args(["--data-dir", "PATH", "--lr", "1e-3"])
    check_args(args)
    assert args.data == "PATH"
    # the original recipe's defaults
    args = parse_args(["PATH"])
    assert (args.aa, args.mixup, args.cutmix, args.smoothing, args.reprob, args.opt, args.sched, args.drop_path,
            args.model_ema, args.model_ema_decay, args.epochs, args.warmup_epochs) == \
        ("rand-m9-mstd0.5-inc1", 0.8, 1.0, 0.1, 0.25, "adamw", "cosine", 0.1, True, 0.99996, 300, 20)


def test_config_sets_defaults_and_flags_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: DVT_tiny\nlr: 2e-3\nweight-decay: .03\nbatch_size: 16\nmodel-ema: false\n"
                   "scale: [0.5, 1.0]\n")
    args = parse_args(["DIR", "--config", str(cfg), "--lr", "1e-4"])
    assert (args.model, args.lr, args.weight_decay, args.batch_size, args.model_ema, args.scale) == \
        ("DVT_tiny", 1e-4, 0.03, 16, False, [0.5, 1.0])
    # every shipped recipe loads
    for path in sorted((REPO / "configs").glob("*.yaml")):
        parse_args(["DIR", "--config", str(path)])


@pytest.mark.parametrize("text, message", [
    ("bacth_size: 8\n", "unknown key 'bacth_size' in config"),
    ("batch-size: eight\n", "key 'batch-size': 'eight' is not a valid int"),
    ("sched: [cosine]\n", "key 'sched' must be a single value"),
    ("model-ema: 1\n", "key 'model-ema' must be true or false"),
    ("mixup-mode: row\n", "key 'mixup-mode': 'row' is not one of batch, pair, elem"),
])
def test_bad_config_is_a_clear_error(tmp_path, image_data, capsys, text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    assert train_main.main([str(image_data), "--config", str(cfg), "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    if "bacth" in text:
        assert "did you mean 'batch-size'" in err


def test_missing_data_folder_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert train_main.main(base_args(missing, tmp_path, "x")) == 1
    err = capsys.readouterr().err
    assert f"dataset folder not found: {missing}" in err and "Traceback" not in err
    (tmp_path / "only_train" / "train" / "a").mkdir(parents=True)
    assert train_main.main(base_args(tmp_path / "only_train", tmp_path, "y")) == 1
    assert "has no 'val/' folder" in capsys.readouterr().err


def test_cli_errors_without_traceback_in_a_real_process(tmp_path):
    """The same errors through ``python main.py``: one line, no traceback, non-zero status."""
    proc = subprocess.run([sys.executable, str(REPO / "main.py"), str(tmp_path / "nowhere"), "--config", TINY,
                           "--apex-amp", "--device", "cpu"], cwd=REPO, env=SUBPROCESS_ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--apex-amp needs NVIDIA apex" in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------- distributed runs

def _two_process_run(tmp_path: Path, data: Path, launcher: list[str], name: str, capsys) -> Path:
    out = tmp_path / "out"
    # --standalone: the launcher binds a free port itself and hands it to the workers (no race
    # with other processes for a port picked in advance)
    cmd = [sys.executable, "-m", *launcher, "--standalone", "--nproc_per_node=2",
           str(REPO / "main.py"), str(data), "--config", TINY, "--model", "DVT_tiny", "--b", "4", "--lr", "2e-3",
           "--weight-decay", ".03", "--amp", "--img-size", "32", "--epochs", "1", "--device", "cpu",
           "--output", str(out), "--experiment", name, "--workers", "1"]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as e:  # keep what the run printed: a hang is otherwise undiagnosable
        text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        text += (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"{launcher[0]} run still going after 240 s; its output:\n{text[-6000:]}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    folder = run_dir(out, name)
    # one process logs: the header line appears once and names both processes, gloo and the
    # precision a bare --amp has on this CPU (bfloat16 where it is native, else float32)
    headers = [line for line in proc.stdout.splitlines() if "parameters" in line]
    expected = f"precision {cpu_amp_dtype() or 'float32'} |"
    assert len(headers) == 1 and "2 process(es) on cpu (gloo)" in headers[0] and expected in headers[0], headers
    for file in ("last.pth.tar", "best.pth.tar", "released.pth.tar", "config.yaml", "summary.csv", "log.txt"):
        assert (folder / file).is_file(), file
    last = load_checkpoint_file(folder / "last.pth.tar")
    # 24 images over 2 processes of batch 4: 3 steps
    assert (last["epoch"], last["step"], last["num_updates"], last["world_size"]) == (1, 0, 3, 2)
    assert len(read_summary(folder / "summary.csv")) == 1
    check_released_with_inference(folder / "released.pth.tar", data, capsys)
    return folder


def test_torchrun_two_processes(tmp_path, image_data, capsys):
    _two_process_run(tmp_path, image_data, ["torch.distributed.run"], "torchrun", capsys)


def test_legacy_launcher_two_processes(tmp_path, image_data, capsys):
    """``python -m torch.distributed.launch`` passes --local-rank to the script (deprecated, still there)."""
    _two_process_run(tmp_path, image_data, ["torch.distributed.launch"], "launch", capsys)


# ------------------------------------------------------------------------- exact resume

DETERMINISTIC = ("--deterministic", "--no-release", "--model", "DVT_tiny_faulty")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, image_data) -> dict:
    """Two epochs of three steps, run straight through."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    set_faults()
    out = tmp_path_factory.mktemp("straight")
    assert train_main.main(base_args(image_data, out, "run", *DETERMINISTIC)) == 0
    torch.set_num_threads(threads)
    folder = run_dir(out, "run")
    return {"last": load_checkpoint_file(folder / "last.pth.tar"), "summary": read_summary(folder / "summary.csv")}


@pytest.mark.parametrize("fault, extra, status, position", [
    (dict(signal_train_at=2), (), 128 + signal.SIGTERM, (0, 2)),  # mid-epoch
    (dict(signal_train_at=3), (), 128 + signal.SIGTERM, (0, 3)),  # after an epoch's last step, before its evaluation
    (dict(signal_eval_at=1), (), 128 + signal.SIGTERM, (1, 0)),  # during evaluation: after the epoch's checkpoint
    (dict(signal_train_at=5, signal=signal.SIGINT), (), 128 + signal.SIGINT, (1, 2)),  # Ctrl-C in the second epoch
    # NaN with --max-bad-steps 1: the run stops, the last recovery checkpoint is intact
    (dict(nan_at=5), ("--recovery-interval", "1", "--max-bad-steps", "1"), 1, (1, 1)),
])
def test_resume_is_bit_identical(tmp_path, image_data, uninterrupted, fault, extra, status, position):
    args = base_args(image_data, tmp_path, "run", *DETERMINISTIC, *extra)
    set_faults(**fault)
    assert train_main.main(args) == status
    folder = run_dir(tmp_path, "run")
    saved = load_checkpoint_file(folder / "last.pth.tar")
    assert (saved["epoch"], saved["step"]) == position
    set_faults()
    assert train_main.main(args + ["--resume", str(folder / "last.pth.tar")]) == 0
    resumed = load_checkpoint_file(folder / "last.pth.tar")
    assert_same_training_state(resumed, uninterrupted["last"])
    # the epoch summaries (per-exit losses and accuracies, train and val) are the same too
    timing = ("img_per_s", "time_s")
    rows = [{k: v for k, v in r.items() if not k.endswith(timing)} for r in read_summary(folder / "summary.csv")]
    expected = [{k: v for k, v in r.items() if not k.endswith(timing)} for r in uninterrupted["summary"]]
    assert rows == expected


def test_grad_accum_stops_after_its_update_and_resumes_exactly(tmp_path, image_data):
    """--grad-accum-steps 2 over epochs of 3 batches: updates of 2 and 1 batches. A SIGTERM in the
    first batch of a group takes effect after the group's update (no half-summed gradients are
    lost or saved), and the resumed run ends bit for bit where an uninterrupted one does."""
    extra = (*DETERMINISTIC, "--grad-accum-steps", "2")
    assert train_main.main(base_args(image_data, tmp_path / "straight", "run", *extra)) == 0
    straight = load_checkpoint_file(run_dir(tmp_path / "straight", "run") / "last.pth.tar")
    assert straight["num_updates"] == 4  # two epochs of 2 + 1 batches
    header = (run_dir(tmp_path / "straight", "run") / "log.txt").read_text().splitlines()[0]
    assert "batch 8 x 1 x 2 accumulated (16 per update)" in header
    args = base_args(image_data, tmp_path / "cut", "run", *extra)
    set_faults(signal_train_at=4)  # the first batch of the second epoch
    assert train_main.main(args) == 128 + signal.SIGTERM
    folder = run_dir(tmp_path / "cut", "run")
    saved = load_checkpoint_file(folder / "last.pth.tar")
    assert (saved["epoch"], saved["step"], saved["num_updates"]) == (1, 2, 3)
    set_faults()
    assert train_main.main(args + ["--resume", str(folder / "last.pth.tar")]) == 0
    assert_same_training_state(load_checkpoint_file(folder / "last.pth.tar"), straight)


def test_external_sigterm_saves_and_resumes_exactly(tmp_path, image_data, uninterrupted):
    """A real SIGTERM from outside, whenever it lands during training."""
    args = base_args(image_data, tmp_path, "run", *DETERMINISTIC[:-2], "--model", "DVT_tiny")
    proc = subprocess.Popen([sys.executable, str(REPO / "main.py"), *args], cwd=REPO, env=SUBPROCESS_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "train 0 [    1/3]" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, "".join(seen) + rest
    assert "resume with: --resume" in rest
    folder = run_dir(tmp_path, "run")
    saved = load_checkpoint_file(folder / "last.pth.tar")
    assert (saved["epoch"], saved["step"]) in ((0, 2), (0, 3), (1, 0))
    assert train_main.main(args + ["--resume", str(folder / "last.pth.tar")]) == 0
    assert_same_training_state(load_checkpoint_file(folder / "last.pth.tar"), uninterrupted["last"])


def test_epoch_order_and_augmentation_depend_only_on_seed_epoch_index():
    a = EpochSampler(10, world_size=2, rank=1, seed=3)
    a.set_epoch(4)
    b = EpochSampler(10, world_size=2, rank=1, seed=3)
    b.set_epoch(4, start=2)
    assert list(b) == list(a)[2:] and len(b) == 3
    both = []
    for rank in range(2):
        s = EpochSampler(10, world_size=2, rank=rank, seed=3)
        s.set_epoch(4)
        both += [i for _, i in s]
    assert sorted(both) == list(range(10))
    ra = EpochSampler(12, world_size=3, rank=0, seed=0, repeats=3)
    assert len(list(ra)) == 4

    class Noise(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(2)

    ds = SeededDataset(Noise(), seed=1)
    before = torch.get_rng_state()
    assert torch.equal(ds[(2, 3)], ds[(2, 3)]) and not torch.equal(ds[(2, 3)], ds[(3, 3)])
    assert torch.equal(torch.get_rng_state(), before)  # the caller's stream is untouched


# -------------------------------------------------------------- precision and failures

def test_bf16_autocast_trains_on_cpu(tmp_path, image_data, capsys):
    assert train_main.main(base_args(image_data, tmp_path, "bf16", "--amp", "--amp-dtype", "bfloat16", "--epochs", "1",
                                      "--no-release")) == 0
    out = capsys.readouterr().out
    assert "precision torch.bfloat16" in out
    last = load_checkpoint_file(run_dir(tmp_path, "bf16") / "last.pth.tar")
    assert last["scaler"] is None  # no GradScaler with bfloat16
    # the resolved config written with the run reproduces the settings through --config
    saved = parse_args(["--config", str(run_dir(tmp_path, "bf16") / "config.yaml")])
    check_args(saved)
    assert resolved_config(saved) == last["config"]
    assert (saved.amp, saved.epochs, saved.img_size, saved.model) == (True, 1, 32, "DVT_tiny")
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert train_main.main(base_args(image_data, tmp_path, "fp16", "--amp-dtype", "float16")) == 2
    assert "float16 needs CUDA" in capsys.readouterr().err


@pytest.mark.parametrize("native", [True, False])
def test_bare_amp_follows_the_cpu(native, tmp_path, image_data, capsys, monkeypatch):
    """A bare --amp on a CPU: bfloat16 where the CPU computes it natively, else float32 with a
    warning (whatever this machine's CPU has)."""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    assert train_main.main(base_args(image_data, tmp_path, "amp", "--amp", "--epochs", "1", "--no-release")) == 0
    out, err = capsys.readouterr()
    assert f"precision {'torch.bfloat16' if native else 'float32'} |" in out, out
    assert ("no native bfloat16" in out + err) is not native, out + err


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, image_data, capsys):
    set_faults(nan_at=4)  # the first step of the second epoch
    assert train_main.main(base_args(image_data, tmp_path, "nan", "--model", "DVT_tiny_faulty",
                                     "--max-bad-steps", "1")) == 1
    err = capsys.readouterr().err
    assert "1 training step in a row had a non-finite loss (the last at epoch 1, step 0" in err
    assert "last good checkpoint" in err and "Traceback" not in err
    folder = run_dir(tmp_path, "nan")
    last = load_checkpoint_file(folder / "last.pth.tar")
    assert (last["epoch"], last["step"], last["num_updates"]) == (1, 0, 3)
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert not (folder / "released.pth.tar").exists()


def test_existing_run_is_not_overwritten(tmp_path, image_data, capsys):
    args = base_args(image_data, tmp_path, "once", "--epochs", "1", "--no-release", "--no-model-ema")
    assert train_main.main(args) == 0
    assert train_main.main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert train_main.main(args + ["--auto-resume"]) == 0  # nothing left to do: the run is complete


# --------------------------------------------------------------- released file, export

def test_export_released_from_any_checkpoint(tmp_path, image_data, uninterrupted, capsys):
    ckpt = tmp_path / "last.pth.tar"
    atomic_save(uninterrupted["last"], ckpt)
    out = tmp_path / "exported.pth.tar"
    assert train_main.main([str(image_data), "--config", TINY, "--device", "cpu", "--export-released", str(ckpt),
                            "--released-path", str(out), "--release-weights", "model"]) == 0
    released = load_checkpoint_file(out)
    assert released["weights"] == "model" and released["dynamic_threshold"].shape == (59, 3)
    assert released["model_state_dict"].keys() == to_original_state_dict(uninterrupted["last"]["model"]).keys()
    check_released_with_inference(out, image_data, capsys)
    assert train_main.main([str(image_data), "--config", TINY, "--device", "cpu", "--eval-checkpoint",
                            str(out)]) == 0
    assert "exit3" in capsys.readouterr().out
    # the same weights labelled with other classes are refused before any evaluation
    assert released["class_names"]
    shifted = dict(released, class_names=list(reversed(released["class_names"])))
    atomic_save(shifted, tmp_path / "shifted.pth.tar")
    assert train_main.main([str(image_data), "--config", TINY, "--device", "cpu", "--eval-checkpoint",
                            str(tmp_path / "shifted.pth.tar")]) == 1
    out_text, err = capsys.readouterr()
    assert "trained on other classes" in err and "exit3" not in out_text


# ----------------------------------------------------------------------------- CIFAR

def test_fake_cifar_is_torchvision_format(tmp_path):
    root = make_fake_cifar(tmp_path / "c10", 10, train_per_batch=4, test_size=6)
    with pytest.raises(RuntimeError, match="not found or corrupted"):
        torchvision.datasets.CIFAR10(str(root), download=False)  # the MD5 of the official archive
    train = CIFAR10Files(str(root), train=True)
    test = CIFAR10Files(str(root), train=False)
    assert len(train) == 20 and len(test) == 6 and train.classes[0] == "airplane"
    image, label = train[0]
    assert image.size == (32, 32) and 0 <= label < 10
    root = make_fake_cifar(tmp_path / "c100", 100, train_per_batch=4, test_size=6)
    assert len(CIFAR100Files(str(root), train=True)) == 20 and len(CIFAR100Files(str(root)).classes) == 100
    assert len(load_cifar("cifar100", root / "cifar-100-python", False, None)) == 6  # the folder itself works too


def test_a_packed_cifar_archive_is_named_with_the_command_that_extracts_it(tmp_path, capsys):
    """The official download, cifar-10-python.tar.gz, given (or its folder) before extracting."""
    root = make_fake_cifar(tmp_path / "c10", 10, train_per_batch=4, test_size=6)
    archive = root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(root / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    shutil.rmtree(root / "cifar-10-batches-py")
    for given in (root, archive):
        code = train_main.main([str(given), "--config", TINY, "--device", "cpu", "--dataset", "cifar10",
                                "--output", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 1 and f"is the packed archive: extract it first (tar xzf {archive} -C {root})" in err, err
    assert not (tmp_path / "out").exists()
    with tarfile.open(archive) as tf:  # the command it gives makes a folder load_cifar reads
        tf.extractall(root)
    assert len(load_cifar("cifar10", root, True, None)) == 20


@pytest.mark.parametrize("dataset, classes, source", [("cifar10", 10, "released"), ("cifar100", 100, "ours")])
def test_cifar_finetuning(tmp_path, image_data, dataset, classes, source, capsys):
    torch.manual_seed(0)
    pretrained = DVT(**{**MODEL_CFGS["DVT_tiny"], "num_classes": 3, "img_size": 32})
    if source == "released":
        ckpt = {"model_state_dict": to_original_state_dict(pretrained.state_dict())}
    else:
        other = DVT(**{**MODEL_CFGS["DVT_tiny"], "num_classes": 3, "img_size": 32})
        # a training checkpoint of ours: fine-tuning starts from its EMA weights
        ckpt = {"format": "dvt-train-1", "model": other.state_dict(), "model_ema": pretrained.state_dict()}
    atomic_save(ckpt, tmp_path / "pretrained.pth.tar")
    data = make_fake_cifar(tmp_path / dataset, classes, train_per_batch=8, test_size=16)
    args = ["--data-dir", str(data), "--config", str(REPO / "configs" / f"{dataset}_finetune.yaml"),
            "--model", "DVT_tiny", "--img-size", "32", "--b", "8", "--epochs", "1", "--workers", "0",
            "--device", "cpu", "--dataset", dataset, "--finetune", str(tmp_path / "pretrained.pth.tar"),
            "--backbone-lr-scale", "0",
            "--calib-size", "16", "--output", str(tmp_path), "--experiment", "ft"]
    assert train_main.main(args) == 0, capsys.readouterr().err
    folder = run_dir(tmp_path, "ft")
    last = load_checkpoint_file(folder / "last.pth.tar")
    assert last["model"]["stages.2.head.weight"].shape[0] == classes
    assert last["model_kwargs"]["num_classes"] == classes
    # a zero backbone learning rate leaves every pretrained weight as it was: they were loaded
    for key, value in pretrained.state_dict().items():
        if ".head." not in key:
            assert torch.equal(last["model"][key], value), key
    released = load_checkpoint_file(folder / "released.pth.tar")
    assert len(released["anytime_classification"]) == 3 and released["flops"][0] > 0


# ------------------------------------------------- checkpoints of the original training

def original_training_checkpoint(path: Path, with_ema: bool = True) -> tuple[dict, dict]:
    """A checkpoint laid out as the original training script writes it (timm's checkpoint saver:
    epoch, arch, state_dict, optimizer, version, args as a Namespace, the scaler's state,
    state_dict_ema, metric), from seeded DVT_tiny weights in the original key layout.
    Returns the raw and the EMA state dicts (ours)."""
    import argparse

    torch.manual_seed(1)
    raw = DVT(**{**MODEL_CFGS["DVT_tiny"], "num_classes": 3, "img_size": 32})
    ema = DVT(**{**MODEL_CFGS["DVT_tiny"], "num_classes": 3, "img_size": 32})
    optimizer = torch.optim.AdamW(raw.parameters())
    checkpoint = {
        "epoch": 299, "arch": "DVT_tiny", "state_dict": to_original_state_dict(raw.state_dict()),
        "optimizer": optimizer.state_dict(), "version": 2,
        "args": argparse.Namespace(model="DVT_tiny", img_size=32, num_classes=3, model_ema=True, lr=2e-3),
        "amp_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000},
        "metric": 80.0,
    }
    if with_ema:
        checkpoint["state_dict_ema"] = to_original_state_dict(ema.state_dict())
    torch.save(checkpoint, path)
    return raw.state_dict(), ema.state_dict()


def test_original_training_checkpoint_gives_its_ema_weights(tmp_path):
    from utils.checkpoint.weights import build_from_checkpoint, checkpoint_weights
    from utils.errors import CheckpointError

    raw, ema = original_training_checkpoint(tmp_path / "model_best.pth.tar")
    checkpoint = load_checkpoint_file(tmp_path / "model_best.pth.tar")  # its options Namespace loads safely
    model, which = build_from_checkpoint(checkpoint, "model_best.pth.tar")  # arch and img_size from the file
    assert which == "ema" and model.model_name == "DVT_tiny" and model.img_size == 32
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ema.items())
    model, which = build_from_checkpoint(checkpoint, "model_best.pth.tar", weights="model")
    assert which == "model" and all(torch.equal(model.state_dict()[k], v) for k, v in raw.items())
    with pytest.raises(CheckpointError, match="holds a DVT_tiny checkpoint, but --model is DVT_T2t_vit_12"):
        build_from_checkpoint(checkpoint, "model_best.pth.tar", name="DVT_T2t_vit_12")

    original_training_checkpoint(tmp_path / "no_ema.pth.tar", with_ema=False)
    checkpoint = load_checkpoint_file(tmp_path / "no_ema.pth.tar")
    assert checkpoint_weights(checkpoint, "auto")[1] == "model"
    with pytest.raises(CheckpointError, match="no EMA weights"):
        checkpoint_weights(checkpoint, "ema")


def test_original_training_checkpoint_release_and_finetune_use_ema(tmp_path, image_data, capsys):
    ckpt = tmp_path / "model_best.pth.tar"
    _, ema = original_training_checkpoint(ckpt)
    out = tmp_path / "released.pth.tar"
    assert train_main.main([str(image_data), "--config", TINY, "--device", "cpu", "--export-released", str(ckpt),
                            "--released-path", str(out), "--release-weights", "ema", "--calib-size", "8"]) == 0
    released = load_checkpoint_file(out)
    assert released["weights"] == "ema"
    expected = to_original_state_dict(ema)
    assert all(torch.equal(released["model_state_dict"][k], v) for k, v in expected.items())
    # inference.py, from the original checkpoint with its defaults, fits the same thresholds (one
    # calibration seed and set for both tools; the same EMA weights; batches of the same size)
    assert inference.main(["--data_url", str(image_data), "--checkpoint_path", str(ckpt), "--eval_mode", "2",
                           "--calib_size", "8", "--batch_size", "16", "--workers", "0", "--no_progress",
                           "--save_checkpoint", str(tmp_path / "fitted.pth.tar")]) == 0
    fitted = load_checkpoint_file(tmp_path / "fitted.pth.tar")
    assert torch.equal(fitted["dynamic_threshold"], released["dynamic_threshold"])

    args = base_args(image_data, tmp_path, "ft", "--finetune", str(ckpt), "--backbone-lr-scale", "0",
                     "--epochs", "1", "--no-release", "--no-model-ema")
    assert train_main.main(args) == 0, capsys.readouterr().err
    assert "(ema weights, 3 -> 3 classes)" in (run_dir(tmp_path, "ft") / "log.txt").read_text()
    last = load_checkpoint_file(run_dir(tmp_path, "ft") / "last.pth.tar")
    for key, value in ema.items():
        if ".head." not in key:
            assert torch.equal(last["model"][key], value), key


def test_header_counts_the_cooldown_epochs(small_data, tmp_path, capsys):
    """--epochs N with --cooldown-epochs C runs N + C epochs (timm's schedule), and the first log line says so."""
    args = base_args(small_data, tmp_path, "cool", "--epochs", "1", "--cooldown-epochs", "1", "--no-release",
                     "--log-interval", "0", "--no-model-ema", "--calib-size", "8")
    assert train_main.main(args) == 0, capsys.readouterr().err
    header = (run_dir(tmp_path, "cool") / "log.txt").read_text().splitlines()[0]
    assert "epochs 2 (1 + 1 cooldown) |" in header, header
    assert load_checkpoint_file(run_dir(tmp_path, "cool") / "last.pth.tar")["epoch"] == 2

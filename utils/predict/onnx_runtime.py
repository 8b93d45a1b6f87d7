"""Real early exit in ONNX Runtime, from a folder written by ``scripts/export_onnx.py``.

The folder holds one ONNX graph per stage (``stage0.onnx``, ``stage1.onnx``, ...; see
:mod:`models.deploy_onnx`) and :data:`FOLDER_JSON`, which keeps what the checkpoint gave
besides the weights: model name, exits, image size, preprocessing (the ``pretrained_cfg``
keys timm's data config reads), cumulative GFLOPs per exit, class names, and the stored
thresholds and budget table under the checkpoint's own keys (``dynamic_threshold``,
``budgeted_batch_classification``), so :func:`utils.budget.choice.choose_thresholds` reads
the JSON as it reads a checkpoint. The folder classifies without the checkpoint::

    from utils.predict import DVTClassifier

    clf = DVTClassifier.from_onnx("exported/t2t12", budget=1.5)  # same rows as from_checkpoint
    cascade = OnnxCascade("exported/t2t12")                      # or the stages alone
    out = cascade.forward_early_exit(images, thresholds)         # EarlyExitOutput

Each stage is an ``onnxruntime.InferenceSession`` wrapped as a callable with the contract of
:class:`models.dvt.ExitStep` (torch tensors in and out, on the CPU), so
:func:`models.dvt.run_early_exit` runs between the sessions exactly as it does between
PyTorch stages: the confidence test and the gathering of the samples that go on.
"""
from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from models.deploy_onnx import onnx_stage_files
from models.dvt import EarlyExitOutput, EarlyExitStream, run_early_exit

from ..budget.choice import as_plain
from ..checkpoint.files import atomic_write
from ..errors import CheckpointError, ConfigError, one_line

__all__ = ["FOLDER_JSON", "OnnxCascade", "OrtStep", "folder_info", "load_steps", "read_folder_info",
           "require_onnx_export", "require_onnxruntime", "resolve_providers", "write_folder_info"]

FOLDER_JSON = "dvt_onnx.json"
FORMAT = "dvt-onnx"
VERSION = 1
INSTALL = "pip install -r requirements-deploy.txt"
# pretrained_cfg keys that timm.data.resolve_data_config reads: the evaluation transform
DATA_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
REQUIRED = ("model_name", "num_exits", "img_size", "in_chans", "num_classes", "pretrained_cfg", "flops")
PROVIDER_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                  "tensorrt": "TensorrtExecutionProvider"}
DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")  # TensorRT only when asked: it builds engines


def require_onnx_export() -> None:
    """Raise a one-line ConfigError naming the requirements file when onnx or onnxscript is missing."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ConfigError(f"ONNX export needs onnx and onnxscript: {INSTALL}") from None


def require_onnxruntime():
    """The ``onnxruntime`` module, or a one-line ConfigError naming the requirements file."""
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(f"running ONNX stages needs onnxruntime: {INSTALL}") from None
    return onnxruntime


def resolve_providers(requested: Optional[Sequence[str]], available: Sequence[str]) -> list[str]:
    """Execution providers for the sessions, in order of preference.

    Args:
        requested: names (``cpu``, ``cuda``, ``tensorrt`` or onnxruntime's own, e.g.
            ``CUDAExecutionProvider``); None: CUDA when this onnxruntime has it, then the CPU.
        available: ``onnxruntime.get_available_providers()``.

    The CPU provider is appended when missing: it runs whatever the others do not take.
    """
    if requested is None:
        return [p for p in DEFAULT_PROVIDERS if p in available]
    providers = [PROVIDER_NAMES.get(p.lower(), p) for p in requested]
    for p in providers:
        if p not in available:
            raise ConfigError(f"execution provider {p} is not available in this onnxruntime (available: "
                              f"{', '.join(available)}); the GPU ones need the onnxruntime-gpu package")
    return providers + ([] if "CPUExecutionProvider" in providers else ["CPUExecutionProvider"])


def folder_info(model: torch.nn.Module, checkpoint: dict, flops: Sequence[float], opset: int) -> dict[str, Any]:
    """The contents of :data:`FOLDER_JSON` for an exported cascade.

    Args:
        model: the cascade that was exported (class names attached, see
            :func:`utils.data.classes.attach_class_names`).
        checkpoint: the checkpoint it came from (its stored thresholds and budget table are kept).
        flops: cumulative GFLOPs per exit.
        opset: the ONNX opset of the graphs.
    """
    cfg = dict(model.pretrained_cfg)
    cfg["input_size"] = (model.in_chans, model.img_size, model.img_size)  # the grids are built for this size
    return {
        "format": FORMAT, "version": VERSION,
        "model_name": getattr(model, "model_name", None), "num_exits": model.num_exits, "img_size": model.img_size,
        "in_chans": model.in_chans, "num_classes": model.num_classes,
        "stages": [p.name for p in onnx_stage_files("", model.num_exits)],
        "pretrained_cfg": {k: as_plain(cfg[k]) for k in DATA_KEYS if k in cfg},
        "flops": [float(f) for f in flops],
        "class_names": cfg.get("label_names"),
        "dynamic_threshold": as_plain(checkpoint.get("dynamic_threshold")),
        "budgeted_batch_classification": as_plain(checkpoint.get("budgeted_batch_classification")),
        "opset": opset, "exported_with": {name: _version(name) for name in ("torch", "onnx", "onnxscript")},
    }


def _version(distribution: str) -> Optional[str]:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def write_folder_info(folder: str | Path, info: dict[str, Any]) -> Path:
    """Write :data:`FOLDER_JSON` into ``folder``; returns its path."""
    lines = [f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in info.items()]  # one entry a line
    text = "{\n" + ",\n".join(lines) + "\n}\n"
    return atomic_write(Path(folder) / FOLDER_JSON, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_folder_info(folder: str | Path) -> dict[str, Any]:
    """:data:`FOLDER_JSON` of ``folder``, checked against the stage files beside it.

    Raises:
        CheckpointError: one line, when the folder, its JSON or a stage file is missing, or
            they do not belong together.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder (write one with scripts/export_onnx.py)")
    path = folder / FOLDER_JSON
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {FOLDER_JSON}: not a folder written by scripts/export_onnx.py "
                              "(or its export did not finish)")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {one_line(e)}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise CheckpointError(f"{path} does not describe exported DVT stages (no \"format\": \"{FORMAT}\")")
    if info.get("version") != VERSION:
        raise CheckpointError(f"{path} has format version {info.get('version')!r}; this code reads version {VERSION}")
    missing = [k for k in REQUIRED if k not in info]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}")
    num_exits = info["num_exits"]
    if not isinstance(num_exits, int) or num_exits < 1:
        raise CheckpointError(f"{path}: num_exits must be a positive integer, got {num_exits!r}")
    flops = info["flops"]
    if not (isinstance(flops, list) and len(flops) == num_exits and all(isinstance(f, (int, float)) for f in flops)):
        raise CheckpointError(f"{path}: flops must list one cumulative GFLOPs value per exit ({num_exits}), "
                              f"got {flops!r}")
    for stage in onnx_stage_files(folder, num_exits):
        if not stage.is_file():
            raise CheckpointError(f"{folder}: {stage.name} is missing ({FOLDER_JSON} lists {num_exits} stages)")
    extra = onnx_stage_files(folder, num_exits + 1)[-1]
    if extra.exists():
        raise CheckpointError(f"{folder} holds {extra.name}, but {FOLDER_JSON} lists {num_exits} stages: "
                              "files of different exports; export again into an empty folder")
    return info


class OrtStep:
    """One ONNX stage as a callable with the contract of :class:`models.dvt.ExitStep`:
    ``(images, *carry) -> (logits, confidence, *carry_out)``, torch tensors on the CPU in and
    out (numpy arrays at the session's boundary, without copies where the layout allows).

    Args:
        session: the stage's ``onnxruntime.InferenceSession``.
    """

    def __init__(self, session) -> None:
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    def __call__(self, x: torch.Tensor, *carry: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feeds = {name: np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())
                 for name, t in zip(self.input_names, (x,) + carry)}
        return tuple(torch.from_numpy(a) for a in self.session.run(self.output_names, feeds))


def load_steps(paths: Sequence[str | os.PathLike], providers: Optional[Sequence[str]] = None,
               threads: Optional[int] = None) -> list[OrtStep]:
    """One :class:`OrtStep` per ONNX file, in order.

    Args:
        paths: the stage files.
        providers: execution providers (see :func:`resolve_providers`).
        threads: intra-op threads of each session (default: onnxruntime's, one per physical core).
    """
    ort = require_onnxruntime()
    chosen = resolve_providers(providers, ort.get_available_providers())
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the commands print one line
    if threads is not None:
        options.intra_op_num_threads = threads
    steps = []
    for path in paths:
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=chosen)
        except Exception as e:  # onnxruntime's own error types: a damaged or foreign file
            raise CheckpointError(f"{path}: onnxruntime cannot load it: {one_line(e)}") from None
        steps.append(OrtStep(session))
    return steps


class OnnxCascade:
    """A DVT cascade exported by ``scripts/export_onnx.py``, run by ONNX Runtime.

    It stands in for the model where only running it matters (as :class:`DVTClassifier`
    uses it): :meth:`forward_early_exit` (real early exit), :meth:`queued_early_exit` and
    :meth:`early_exit_stream` (the later stages on full batches), ``cascade(x)`` (every exit), and
    the attributes ``model_name``, ``num_exits``, ``num_classes``, ``img_size``, ``in_chans``,
    ``pretrained_cfg`` and ``flops`` (cumulative GFLOPs per exit). Images and results are
    float32 torch tensors on the CPU; the providers decide where the stages run.

    Args:
        folder: the exported folder.
        providers: execution providers (see :func:`resolve_providers`); default CUDA when
            available, then the CPU.
        threads: intra-op threads of each session (default: onnxruntime's, one per physical core).
        img_size: the image size the caller expects; a folder exported for another is refused.

    Raises:
        CheckpointError: the folder is missing or inconsistent (see :func:`read_folder_info`),
            or a stage does not load or does not fit the JSON.
        ConfigError: onnxruntime is missing, a provider is not available, or ``img_size`` differs.
    """

    def __init__(self, folder: str | os.PathLike, providers: Optional[Sequence[str]] = None,
                 threads: Optional[int] = None, img_size: Optional[int] = None) -> None:
        require_onnxruntime()  # before the folder: its absence is the first thing to fix
        self.folder = Path(folder)
        self.info = read_folder_info(self.folder)
        self.model_name = self.info["model_name"]
        self.num_exits = self.info["num_exits"]
        self.img_size = self.info["img_size"]
        self.in_chans = self.info["in_chans"]
        self.num_classes = self.info["num_classes"]
        self.pretrained_cfg = {k: tuple(v) if isinstance(v, list) else v  # timm's tuples, not JSON's lists
                               for k, v in self.info["pretrained_cfg"].items()}
        self.flops = [float(f) for f in self.info["flops"]]
        if img_size is not None and img_size != self.img_size:
            raise ConfigError(f"{self.folder} was exported for {self.img_size} px images, not {img_size}: export "
                              f"again with --img-size {img_size}")
        self.steps = load_steps(onnx_stage_files(self.folder, self.num_exits), providers, threads)
        self.providers = self.steps[0].session.get_providers()
        self._check_stages()

    def _check_stages(self) -> None:
        """Each stage takes the images of the JSON's size and what the previous stage hands on,
        and gives logits over the JSON's classes."""
        expected_inputs = 1
        for k, step in enumerate(self.steps):
            name = f"{self.folder / f'stage{k}.onnx'}"
            inputs, outputs = step.session.get_inputs(), step.session.get_outputs()
            image_shape = list(inputs[0].shape[1:])
            if image_shape != [self.in_chans, self.img_size, self.img_size]:
                raise CheckpointError(f"{name} takes images of shape {image_shape}, but {FOLDER_JSON} says "
                                      f"{[self.in_chans, self.img_size, self.img_size]}: files of different exports")
            hands_on = len(outputs) > 2
            if len(inputs) != expected_inputs or hands_on == (k + 1 == self.num_exits) or \
                    outputs[0].shape[1:] != [self.num_classes]:
                raise CheckpointError(f"{name} does not fit stage {k} of the {self.num_exits} in {FOLDER_JSON} "
                                      "(its inputs, outputs or classes differ): files of different exports")
            expected_inputs = len(outputs) - 1  # the images, then everything after logits and confidence

    def to(self, device: str | torch.device) -> "OnnxCascade":
        """The cascade takes CPU tensors; the providers choose where it runs."""
        if torch.device(device).type != "cpu":
            raise ConfigError("ONNX stages take CPU tensors: choose the GPU with providers=['cuda'], not the device")
        return self

    def eval(self) -> "OnnxCascade":
        return self

    def _check_images(self, x: torch.Tensor) -> None:
        expected = (self.in_chans, self.img_size, self.img_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected images of shape (batch, {', '.join(map(str, expected))}), got "
                             f"{tuple(x.shape)}; {self.folder} was exported for {self.img_size} px")

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Images (B, 3, H, W) -> every exit's logits, as ``model(x)``."""
        self._check_images(x)
        logits, carry = [], ()
        for step in self.steps:
            out = step(x, *carry)
            logits.append(out[0])
            carry = out[2:]
        return tuple(logits)

    def forward_early_exit(self, x: torch.Tensor, thresholds: Sequence[float] | torch.Tensor) -> EarlyExitOutput:
        """Real early exit over the sessions, as :meth:`models.dvt.DVT.forward_early_exit`."""
        self._check_images(x)
        return run_early_exit(self.steps, x.to("cpu", torch.float32), self._thresholds(thresholds))

    def queued_early_exit(self, batches: Iterable[torch.Tensor], thresholds: Sequence[float] | torch.Tensor,
                          queue: Optional[int] = None) -> Iterator[EarlyExitOutput]:
        """Real early exit over a stream of batches, the later stages on full batches, as
        :meth:`models.dvt.DVT.queued_early_exit`."""
        yield from self.early_exit_stream(thresholds, queue).over(batches)

    def early_exit_stream(self, thresholds: Sequence[float] | torch.Tensor,
                          queue: Optional[int] = None) -> EarlyExitStream:
        """:meth:`queued_early_exit` with the batches handed in, as :meth:`models.dvt.DVT.early_exit_stream`."""
        return EarlyExitStream(self.steps, self._thresholds(thresholds), queue, prepare=self._cpu_images)

    def _cpu_images(self, x: torch.Tensor) -> torch.Tensor:
        self._check_images(x)
        return x.to("cpu", torch.float32)

    def _thresholds(self, thresholds: Sequence[float] | torch.Tensor) -> torch.Tensor:
        thresholds = torch.as_tensor(thresholds, dtype=torch.float32)
        if thresholds.shape != (self.num_exits,):
            raise ValueError(f"expected {self.num_exits} thresholds, got shape {tuple(thresholds.shape)}")
        return thresholds

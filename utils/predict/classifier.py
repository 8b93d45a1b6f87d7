"""Classify images with a DVT checkpoint under a budget, with real early exit.

::

    from utils.predict import DVTClassifier

    clf = DVTClassifier.from_checkpoint("DVT_T2t_vit_12.pth.tar", budget=1.5, device="cpu")
    for p in clf.predict(["cat.jpg", "dog.png"], topk=5):
        print(p.path, p.index, p.name, p.confidence, p.exit, p.gflops)
    rows = clf.predict_paths(["photos/"], batch_size=64, workers=4)  # any number of images, streamed

The images are preprocessed with the model's own evaluation transform (input size,
interpolation, crop and mean/std of its ``pretrained_cfg``, through timm). Every stage runs
only on the images still in the cascade (:meth:`models.dvt.DVT.forward_early_exit`); an
image pays the cumulative GFLOPs of the exit it leaves at. The thresholds come from
:func:`utils.budget.choice.choose_thresholds`; class names from :mod:`utils.data.classes`.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from timm.data import create_transform, resolve_data_config

from models.dvt import EarlyExitOutput
from models.factory import guess_model

from ..budget.choice import ThresholdChoice, choose_thresholds
from ..budget.flops import exit_costs
from ..checkpoint.files import load_checkpoint_file
from ..checkpoint.weights import build_from_checkpoint, checkpoint_weights
from ..data.classes import attach_class_names, label_mapper
from ..data.images import to_rgb, upright
from ..errors import one_line
from ..precision import autocast_context, resolve_precision
from .sources import ImageBatch, check_sources, read_photo, stream_batches


@dataclass(frozen=True)
class Prediction:
    """The answer for one image.

    Attributes:
        path: the image file (None for images given as PIL images or tensors).
        index: predicted class index.
        name: its label ("" when the classes have no names).
        confidence: the top softmax probability at the exit taken.
        exit: the exit taken, 1 to the number of exits.
        gflops: the cumulative GFLOPs of that exit: what classifying this image cost.
        topk_index, topk_name, topk_prob: the k most probable classes at that exit.
        error: why the image could not be classified (every other field is then empty).
    """
    path: Optional[str]
    index: Optional[int] = None
    name: Optional[str] = None
    confidence: Optional[float] = None
    exit: Optional[int] = None
    gflops: Optional[float] = None
    topk_index: tuple[int, ...] = ()
    topk_name: tuple[str, ...] = ()
    topk_prob: tuple[float, ...] = ()
    error: Optional[str] = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _checked_rows(images: torch.Tensor, paths: Optional[Sequence[Optional[str]]],
                  errors: Optional[Sequence[Optional[str]]]) -> tuple[list, list]:
    """The paths and errors of a batch's rows (defaults: None each, one row per image), checked
    against its images."""
    errors = list(errors) if errors is not None else [None] * images.shape[0]
    paths = list(paths) if paths is not None else [None] * len(errors)
    if sum(e is None for e in errors) != images.shape[0] or len(paths) != len(errors):
        raise ValueError("classify: one path and one error entry per row, and one image per row without error")
    return paths, errors


def image_from_array(a: np.ndarray) -> Image.Image:
    """A uint8 (H, W, 3) RGB, (H, W, 4) RGBA or (H, W) grayscale array as a PIL image."""
    if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ValueError(f"expected images as uint8 arrays of shape (H, W, 3), (H, W, 4) or (H, W), got {a.dtype} "
                         f"of shape {a.shape} (a preprocessed batch goes in as a torch tensor)")
    return Image.fromarray(np.ascontiguousarray(a))


def amp_dtype_of(amp: Optional[str | torch.dtype], device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype from None, a dtype, or a name under the shared ``--amp`` rule of
    :func:`utils.precision.resolve_precision` (``auto``, ``bf16``, ``fp16``, ...)."""
    if amp is None or isinstance(amp, torch.dtype):
        return amp
    precision = resolve_precision(amp, device)
    if precision.warning:
        warnings.warn(precision.warning, stacklevel=3)
    return precision.dtype


class DVTClassifier:
    """A DVT cascade with thresholds, exit costs, class names and its preprocessing.

    Args:
        model: the cascade (moved to ``device`` and put in eval mode).
        choice: the thresholds (see :mod:`utils.budget.choice`).
        flops: cumulative GFLOPs of each exit.
        device: where the model runs.
        amp: autocast dtype or name, None for full precision.
        label_type: ``description``, ``name``, ``detailed`` or ``none`` (see :mod:`utils.data.classes`).
    """

    def __init__(self, model: nn.Module, choice: ThresholdChoice, flops: Sequence[float],
                 device: str | torch.device = "cpu", amp: Optional[str | torch.dtype] = None,
                 label_type: str = "description") -> None:
        self.device = torch.device(device)
        self.amp_dtype = amp_dtype_of(amp, self.device)
        self.model = model.to(self.device).eval()
        self.choice = choice
        self.thresholds = torch.tensor(choice.thresholds, dtype=torch.float32)
        self.flops = [float(f) for f in flops]
        self.to_label = label_mapper(model, label_type)
        self.data_config = resolve_data_config({}, model=model)
        if getattr(model, "img_size", None):  # the token grids are fixed by the model's own size
            self.data_config["input_size"] = (self.data_config["input_size"][0], model.img_size, model.img_size)
        self.transform = create_transform(**self.data_config, is_training=False)

    @classmethod
    def from_checkpoint(
            cls,
            path: str | os.PathLike,
            model: Optional[str] = None,
            budget: Optional[float] = None,
            budget_index: Optional[int] = None,
            thresholds: Optional[Sequence[float]] = None,
            device: str | torch.device = "cpu",
            amp: Optional[str | torch.dtype] = None,
            class_names: Optional[Sequence[str] | str | os.PathLike] = None,
            label_type: str = "description",
            img_size: Optional[int] = None,
    ) -> "DVTClassifier":
        """Load a checkpoint (released layout or this project's) and choose its thresholds.

        Args:
            path: the checkpoint file.
            model: model name, for files that do not name theirs (when left out, the registered
                cascade whose layout the weights have); must agree with the file's own name.
            budget, budget_index, thresholds: the threshold choice (see
                :func:`utils.budget.choice.choose_thresholds`).
            device, amp: where and in which autocast dtype to run.
            class_names: names (a list, or a file with one per line or a JSON list) that replace
                the checkpoint's ``class_names``.
            label_type: see :mod:`utils.data.classes`.
            img_size: input resolution, when not the checkpoint's (released files: 224).
        """
        source = str(path)
        checkpoint = load_checkpoint_file(path)
        overrides = {} if img_size is None else {"img_size": img_size}
        found = None
        if model is None and not checkpoint.get("model_name"):
            found = guess_model(checkpoint_weights(checkpoint, "auto", source)[0])
        net, _ = build_from_checkpoint(checkpoint, source, name=model, default_name=found and found[0],
                                       defaults=found and found[1], **overrides)
        attach_class_names(net, checkpoint, source, class_names)
        choice = choose_thresholds(checkpoint, net.num_exits, thresholds, budget, budget_index, source)
        return cls(net, choice, exit_costs(net, checkpoint, source)[0], device, amp, label_type)

    @classmethod
    def from_onnx(
            cls,
            folder: str | os.PathLike,
            budget: Optional[float] = None,
            budget_index: Optional[int] = None,
            thresholds: Optional[Sequence[float]] = None,
            class_names: Optional[Sequence[str] | str | os.PathLike] = None,
            label_type: str = "description",
            img_size: Optional[int] = None,
            providers: Optional[Sequence[str]] = None,
            threads: Optional[int] = None,
    ) -> "DVTClassifier":
        """Load a folder written by ``scripts/export_onnx.py``: the stages run in ONNX Runtime
        (:class:`utils.predict.onnx_runtime.OnnxCascade`, real early exit between them), with
        the preprocessing, exit costs, class names and threshold choice the checkpoint gives,
        kept in the folder's JSON. Needs onnxruntime (requirements-deploy.txt).

        Args:
            folder: the exported folder.
            budget, budget_index, thresholds, class_names, label_type: as :meth:`from_checkpoint`.
            img_size: the size expected; a folder exported for another is refused.
            providers, threads: ONNX Runtime execution providers and threads per session
                (see :class:`utils.predict.onnx_runtime.OnnxCascade`).
        """
        from .onnx_runtime import OnnxCascade  # onnxruntime is an optional dependency

        net = OnnxCascade(folder, providers=providers, threads=threads, img_size=img_size)
        attach_class_names(net, net.info, str(folder), class_names)
        choice = choose_thresholds(net.info, net.num_exits, thresholds, budget, budget_index, str(folder))
        return cls(net, choice, net.flops, "cpu", None, label_type)

    @property
    def num_exits(self) -> int:
        return len(self.flops)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast_context(self.device, self.amp_dtype)

    @torch.no_grad()
    def classify(self, images: torch.Tensor, paths: Optional[Sequence[Optional[str]]] = None,
                 errors: Optional[Sequence[Optional[str]]] = None, topk: int = 0) -> list[Prediction]:
        """Classify a preprocessed batch.

        Args:
            images: (B', 3, H, W), already transformed (see :attr:`transform`).
            paths: a name per row of the result (default: None each).
            errors: per row of the result, None or why it has no image; the rows without an
                error take the images in order (default: no errors, one row per image).
            topk: also give the k most probable classes.
        """
        paths, errors = _checked_rows(images, paths, errors)
        out = None
        if images.shape[0]:
            with self.autocast():
                out = self.model.forward_early_exit(images.to(self.device, non_blocking=True), self.thresholds)
        return self._rows(out, paths, errors, topk)

    @torch.no_grad()
    def classify_stream(self, batches: Iterable[ImageBatch], topk: int = 0,
                        queue: Optional[int] = None) -> Iterator[list[Prediction]]:
        """:meth:`classify` on each batch of a stream, one list of rows per batch, in order, with
        the later stages run on full batches: the images a batch sends on wait for those of the
        next batches (``queued_early_exit`` of the model). A batch's rows come once all its
        images have left; they are :meth:`classify`'s up to the rounding of kernels at another
        batch size.

        Args:
            batches: :class:`~utils.predict.sources.ImageBatch` es (images, paths, errors).
            topk: also give the k most probable classes.
            queue: images a later stage waits for (default: the first batch's).
        """
        if not hasattr(self.model, "queued_early_exit"):  # one exit: nothing to queue
            for batch in batches:
                yield self.classify(batch.images, batch.paths, batch.errors, topk)
            return
        pending: deque[tuple[list, list]] = deque()  # the batches read, not yet answered

        def images() -> Iterator[torch.Tensor]:
            for batch in batches:
                pending.append(_checked_rows(batch.images, batch.paths, batch.errors))
                if batch.images.shape[0]:  # a batch of unreadable files alone is answered with the next
                    yield batch.images.to(self.device, non_blocking=True)

        outputs = self.model.queued_early_exit(images(), self.thresholds, queue)
        while True:
            with self.autocast():  # entered per step: the caller's code between batches runs without it
                out = next(outputs, None)
            while pending and (out is None or sum(e is None for e in pending[0][1]) == 0):
                yield self._rows(None, *pending.popleft(), topk)
            if out is None:
                return
            yield self._rows(out, *pending.popleft(), topk)

    def _rows(self, out: Optional[EarlyExitOutput], paths: Sequence[Optional[str]],
              errors: Sequence[Optional[str]], topk: int) -> list[Prediction]:
        """One :class:`Prediction` per row: its error, or the next image's answer in ``out``."""
        if out is not None:
            probs = out.logits.float().softmax(dim=-1).cpu()
            exits, confidence = out.exit_index.cpu().tolist(), out.confidence.cpu().tolist()
            index = probs.argmax(dim=-1).tolist()
            k = min(topk, probs.shape[1])
            top_p, top_i = probs.topk(k, dim=-1) if k else (probs[:, :0], probs[:, :0].long())
        rows, j = [], 0
        for path, error in zip(paths, errors):
            if error is not None:
                rows.append(Prediction(path, error=error))
                continue
            rows.append(Prediction(
                path, index[j], self.label(index[j]), confidence[j], exits[j] + 1, self.flops[exits[j]],
                tuple(top_i[j].tolist()), tuple(self.label(i) for i in top_i[j].tolist()), tuple(top_p[j].tolist())))
            j += 1
        return rows

    def label(self, index: int) -> str:
        return self.to_label(index) if self.to_label is not None else ""

    def predict(self, images: Any, topk: int = 0) -> list[Prediction]:
        """Classify images given as a tensor batch (preprocessed, (B, 3, H, W) or one (3, H, W)),
        or as one or a list of PIL images, file paths and uint8 arrays ((H, W, 3) RGB, (H, W, 4)
        RGBA or (H, W) grayscale, as ``np.asarray(pil_image)`` gives; OpenCV's are BGR:
        ``a[..., ::-1]``), an unreadable file giving a row with its ``error``. Images and files
        are turned as their EXIF orientation tag says, as a viewer shows them."""
        if isinstance(images, torch.Tensor):
            return self.classify(images.unsqueeze(0) if images.dim() == 3 else images, topk=topk)
        if isinstance(images, np.ndarray) and images.ndim in (2, 3):  # one image, not a stack of them
            images = [images]
        items = [image_from_array(x) if isinstance(x, np.ndarray) else x
                 for x in ([images] if isinstance(images, (Image.Image, str, os.PathLike)) else list(images))]
        tensors, paths, errors = [], [], []
        for item in items:
            is_image = isinstance(item, Image.Image)
            paths.append(None if is_image else os.fspath(item))
            try:
                tensors.append(self.transform(to_rgb(upright(item))) if is_image else
                               read_photo(paths[-1], self.transform))
                errors.append(None)
            except Exception as e:  # one bad image is that image's row, not the end of the call
                errors.append(one_line(e))
        batch = torch.stack(tensors) if tensors else torch.empty(0, *self.data_config["input_size"])
        return self.classify(batch, paths, errors, topk)

    def predict_batches(self, sources: Sequence[str | os.PathLike], batch_size: int = 64, workers: int = 0,
                        topk: int = 0) -> Iterator[list[Prediction]]:
        """The predictions for every image of ``sources`` (image files, folders walked
        recursively, text files listing paths), a batch at a time, in order, with constant
        memory; ``workers`` loader processes read the images."""
        batches = stream_batches(check_sources(sources), self.transform, batch_size, workers,
                                 pin_memory=self.device.type == "cuda")
        yield from self.classify_stream(batches, topk, queue=batch_size)

    def predict_paths(self, sources: Sequence[str | os.PathLike], batch_size: int = 64, workers: int = 0,
                      topk: int = 0) -> Iterator[Prediction]:
        """:meth:`predict_batches`, one prediction at a time."""
        for rows in self.predict_batches(sources, batch_size, workers, topk):
            yield from rows

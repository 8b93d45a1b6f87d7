"""Per-exit statistics over a dataset: the confidence and correctness of every exit per sample,
the compact summary the threshold search (:mod:`utils.budget`) works from, and the one loop
that runs a cascade over a loader (:func:`exit_batches`) for every evaluation: the statistics,
real early exit, the validation run of ``inference.py`` and the per-exit metrics of training."""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from ..precision import autocast_context
from ..run.progress import ProgressBar


@torch.no_grad()
def exit_stats(probs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Compact per-sample summary of the exits' softmax outputs.

    Args:
        probs: ``(E, N, C)`` softmax probabilities of every exit.
        targets: ``(N,)`` integer class labels.

    Returns:
        ``confidence``: ``(E, N)`` float32, the max probability of every exit;
        ``correct``: ``(E, N)`` bool, whether that exit's arg-max is the label.
        Both on the device of ``probs``.
    """
    if probs.dim() != 3:
        raise ValueError(f"probs must be (exits, N, classes), got shape {tuple(probs.shape)}")
    confidence, prediction = probs.max(dim=-1)  # (E, N), (E, N)
    correct = prediction == targets.to(prediction.device).view(1, -1)  # (E, N)
    return confidence.to(torch.float32), correct


class ExitStatsAccumulator:
    """Collects :func:`exit_stats` batch by batch, keeping only ``(E, B)`` CPU tensors.

    Example::

        acc = ExitStatsAccumulator()
        for images, targets in loader:
            acc.update(model(images), targets)  # model returns one (B, C) logit tensor per exit
        confidence, correct = acc.result()      # (E, N), (E, N)
    """

    def __init__(self) -> None:
        self._confidence: list[Tensor] = []
        self._correct: list[Tensor] = []
        self.num_samples = 0

    @torch.no_grad()
    def update(self, logits_per_exit: Sequence[Tensor], targets: Tensor) -> None:
        """Add one batch.

        Args:
            logits_per_exit: one ``(B, C)`` logit tensor per exit (or a stacked
                ``(E, B, C)`` tensor); the softmax is taken in float32.
            targets: ``(B,)`` integer labels.
        """
        logits = torch.stack([torch.as_tensor(x) for x in logits_per_exit])  # (E, B, C)
        probs = torch.softmax(logits.to(torch.float32), dim=-1)
        confidence, correct = exit_stats(probs, targets)  # (E, B), (E, B)
        if self._confidence and confidence.shape[0] != self._confidence[0].shape[0]:
            raise ValueError(
                f"got {confidence.shape[0]} exits, earlier batches had {self._confidence[0].shape[0]}")
        self._confidence.append(confidence.cpu())
        self._correct.append(correct.cpu())
        self.num_samples += confidence.shape[1]

    def result(self) -> tuple[Tensor, Tensor]:
        """``(confidence, correct)`` of all samples so far, ``(E, N)`` each, in update order."""
        if not self._confidence:
            raise ValueError("no batch was added")
        return torch.cat(self._confidence, dim=1), torch.cat(self._correct, dim=1)

    def nbytes(self) -> int:
        """Bytes held by the stored summaries."""
        return sum(t.numel() * t.element_size() for t in self._confidence + self._correct)


def anytime_accuracy(correct: Tensor) -> list[float]:
    """Top-1 accuracy (%) of every exit when all samples run it: ``(E, N)`` bool -> E floats."""
    n = correct.shape[1]
    return [hits * 100.0 / n for hits in correct.sum(dim=1).tolist()]


def exit_shares(exit_index: Tensor, num_exits: int) -> list[float]:
    """Share of the samples leaving at each exit: ``(N,)`` exit indices -> E floats."""
    counts = torch.bincount(exit_index, minlength=num_exits)[:num_exits]
    return [c / max(exit_index.numel(), 1) for c in counts.tolist()]


def expected_gflops(shares: Sequence[float], flops: Sequence[float]) -> float:
    """Average cost per sample: the exit shares weighted by the exits' cumulative GFLOPs."""
    return float(sum(s * f for s, f in zip(shares, flops)))


class ExitBatch(NamedTuple):
    """One batch of :func:`exit_batches`.

    images, targets: the batch on the device. logits: one ``(B, C)`` tensor per exit from
    running every exit (None when not asked). seconds: model time of that run (0 untimed).
    early: per threshold set, the adaptive run's :class:`models.dvt.EarlyExitOutput` of every
    batch answered at this one (this batch alone when batch by batch; with queued early exit,
    none, this one or several earlier ones, in order) and its model time.
    """
    images: Tensor
    targets: Tensor
    logits: Optional[Sequence[Tensor]]
    seconds: float
    early: list[tuple[list[Any], float]]


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _run(call: Callable[..., Any], args: tuple, device: torch.device | str, timed: bool) -> tuple[Any, float]:
    """``call(*args)`` and its time, with the device synchronised around it when ``timed``."""
    if not timed:
        return call(*args), 0.0
    _sync(device)
    start = time.perf_counter()
    out = call(*args)
    _sync(device)
    return out, time.perf_counter() - start


def _with_last(items: Iterable) -> Iterator[tuple[Any, bool]]:
    """``(item, whether it is the last one)`` for each item, reading one ahead."""
    it = iter(items)
    try:
        item = next(it)
    except StopIteration:
        return
    for following in it:
        yield item, False
        item = following
    yield item, True


class _EarlyRun:
    """One threshold set's adaptive run in :func:`exit_batches`: each batch on its own
    (``forward_early_exit``) or, queued, one :class:`models.dvt.EarlyExitStream` over all of them."""

    def __init__(self, model: torch.nn.Module, thresholds: Tensor, queued: bool) -> None:
        self.model, self.thresholds = model, thresholds
        self.stream = model.early_exit_stream(thresholds) if queued else None

    def __call__(self, images: Tensor, last: bool) -> list[Any]:
        if self.stream is None:
            return [self.model.forward_early_exit(images, self.thresholds)]
        return self.stream.push(images) + (self.stream.close() if last else [])


@torch.no_grad()
def exit_batches(
        model: torch.nn.Module,
        loader: Iterable,
        device: torch.device | str = "cpu",
        amp_dtype: Optional[torch.dtype] = None,
        desc: Optional[str] = None,
        progress: bool = True,
        all_exits: bool = True,
        early_thresholds: Sequence[Tensor] = (),
        timed: bool = False,
        queued: bool = False,
) -> Iterator[ExitBatch]:
    """Run the cascade over ``loader`` in eval mode, without gradients, under autocast, and
    yield every batch with what was run on it.

    Args:
        model: the cascade (or a stand-in with its call and ``forward_early_exit``).
        loader: ``(images, targets)`` batches.
        device: where the model runs.
        amp_dtype: autocast dtype, or None for full precision.
        desc, progress: the progress bar's label, and whether to show it.
        all_exits: run every exit on the whole batch.
        early_thresholds: ``(E,)`` thresholds per adaptive run (real early exit) on the batch.
        timed: measure model time only (data loading excluded); with early exit, the first
            batch is run once untimed first, so one-off setup costs do not skew the rates.
        queued: real early exit as one stream over the batches (``early_exit_stream`` of the
            model: the later stages on full batches of the samples that go on, gathered across
            batches); a batch's results come once all its samples have left. Models with one
            exit (no ``exit_steps``) run batch by batch.
    """
    model.eval()
    warm = not (timed and len(early_thresholds))
    queued = queued and hasattr(model, "exit_steps")
    runs = [_EarlyRun(model, t, queued) for t in early_thresholds]
    bar = ProgressBar(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    # a stream is closed with the last batch: read one batch ahead to know which that is
    batches = _with_last(bar) if queued and runs else ((batch, False) for batch in bar)
    for (images, targets), last in batches:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast_context(device, amp_dtype):
            if not warm:
                if all_exits:
                    model(images)
                for thresholds in early_thresholds:
                    model.forward_early_exit(images, thresholds)
                warm = True
            logits, seconds = _run(model, (images,), device, timed) if all_exits else (None, 0.0)
            early = [_run(run, (images, last), device, timed) for run in runs]
        yield ExitBatch(images, targets, logits, seconds, early)


@torch.no_grad()
def collect_exit_stats(
        model: torch.nn.Module,
        loader: Iterable,
        device: torch.device | str = "cpu",
        amp_dtype: Optional[torch.dtype] = None,
        desc: Optional[str] = None,
        progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run every exit over ``loader`` and keep, per sample and exit, only the confidence
    (max softmax probability) and whether the prediction is right.

    Returns:
        confidence (E, N) float32 and correct (E, N) bool, on the CPU, in loader order.
    """
    acc = ExitStatsAccumulator()
    for batch in exit_batches(model, loader, device, amp_dtype, desc, progress):
        acc.update(batch.logits, batch.targets)
    return acc.result()


class EarlyExitRun(NamedTuple):
    """A cascade's real early exit over a dataset, in loader order, on the CPU.

    exit_index: (N,) exit each sample left at; prediction: (N,) its class there; confidence:
    (N,) its max softmax probability there; targets: (N,) labels; seconds: model time.
    """
    exit_index: Tensor
    prediction: Tensor
    confidence: Tensor
    targets: Tensor
    seconds: float


class EarlyExitAccumulator:
    """Collects the adaptive runs of :func:`exit_batches` batch by batch; a batch's targets wait
    for its results when those come later (queued early exit)."""

    def __init__(self) -> None:
        self._parts: tuple[list[Tensor], ...] = ([], [], [], [])
        self._targets: list[Tensor] = []  # of the batches not answered yet, in order
        self.seconds = 0.0

    def update(self, outs: Sequence[Any], targets: Tensor, seconds: float = 0.0) -> None:
        """Add one batch's ``targets`` and the :class:`models.dvt.EarlyExitOutput` of every batch
        answered with it (the oldest unanswered first)."""
        self._targets.append(targets)
        if len(outs) > len(self._targets):
            raise ValueError(f"{len(outs)} results for {len(self._targets)} batches")
        for out in outs:
            labels = self._targets.pop(0)
            if out.exit_index.shape != labels.shape:
                raise ValueError(f"a result of {out.exit_index.shape[0]} samples for a batch of {labels.shape[0]}")
            for part, value in zip(self._parts, (out.exit_index, out.logits.argmax(dim=-1), out.confidence, labels)):
                part.append(value.cpu())
        self.seconds += seconds

    def result(self) -> EarlyExitRun:
        if self._targets:
            raise ValueError(f"{len(self._targets)} batches have no result")
        return EarlyExitRun(*(torch.cat(part) for part in self._parts), self.seconds)


def collect_early_exit(model: torch.nn.Module, loader: Iterable, thresholds: Tensor,
                       device: torch.device | str = "cpu", amp_dtype: Optional[torch.dtype] = None,
                       desc: Optional[str] = None, progress: bool = False, queued: bool = False) -> EarlyExitRun:
    """Run the cascade adaptively over ``loader``: later stages only see the samples that
    earlier exits were not confident about (``queued``: see :func:`exit_batches`)."""
    acc = EarlyExitAccumulator()
    for batch in exit_batches(model, loader, device, amp_dtype, desc, progress, all_exits=False,
                              early_thresholds=[thresholds], queued=queued):
        acc.update(batch.early[0][0], batch.targets)
    return acc.result()


class ValRun(NamedTuple):
    """Validation results of running every exit, and of each early-exit threshold set.

    confidence, correct, prediction: (E, N) of every exit; targets: (N,); seconds: model time
    of all exits; early: one :class:`EarlyExitRun` per threshold set.
    """
    confidence: Tensor
    correct: Tensor
    prediction: Tensor
    targets: Tensor
    seconds: float
    early: list[EarlyExitRun]


def validation_run(
        model: torch.nn.Module,
        loader: Iterable,
        device: torch.device | str,
        amp_dtype: Optional[torch.dtype],
        early_thresholds: Sequence[Tensor] = (),
        progress: bool = True,
        queued: bool = False,
) -> ValRun:
    """Run every exit on each batch and, on the same batch, the adaptive cascade for every
    threshold set, timed (see :func:`exit_batches`).

    Args:
        model: the cascade, on ``device``.
        loader: (images, targets) batches.
        device: where the model runs.
        amp_dtype: autocast dtype, or None for full precision.
        early_thresholds: (E,) thresholds per adaptive run.
        progress: show a progress bar.
        queued: each adaptive run as one stream over the batches (see :func:`exit_batches`).
    """
    stats = ExitStatsAccumulator()
    early = [EarlyExitAccumulator() for _ in early_thresholds]
    predictions: list[Tensor] = []
    labels: list[Tensor] = []
    seconds = 0.0
    for batch in exit_batches(model, loader, device, amp_dtype, "val", progress,
                              early_thresholds=early_thresholds, timed=True, queued=queued):
        seconds += batch.seconds
        for acc, (outs, elapsed) in zip(early, batch.early):
            acc.update(outs, batch.targets, elapsed)
        stats.update(batch.logits, batch.targets)
        predictions.append(torch.stack([x.argmax(dim=-1) for x in batch.logits]).cpu())  # (E, B)
        labels.append(batch.targets.cpu())
    confidence, correct = stats.result()
    return ValRun(confidence, correct, torch.cat(predictions, dim=1), torch.cat(labels), seconds,
                  [acc.result() for acc in early])

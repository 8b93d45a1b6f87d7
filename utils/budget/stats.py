"""Per-exit statistics over a dataset: the confidence and correctness of every exit per sample,
the compact summary the threshold search (:mod:`utils.budget`) works from."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..precision import autocast_context


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
    model.eval()
    acc = ExitStatsAccumulator()
    for images, targets in tqdm(loader, desc=desc, disable=not progress, leave=False):
        images = images.to(device, non_blocking=True)
        with autocast_context(device, amp_dtype):
            logits = model(images)
        acc.update(logits, targets.to(device))
    return acc.result()

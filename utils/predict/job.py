"""A ``--predict`` run in one process or several (torchrun): the images cut into batches, dealt
to the processes, classified, and their rows written in input order by the first process,
resumable after an interruption (:mod:`utils.predict.resume`).

The images are cut into batches of ``batch_size`` consecutive paths in the order the sources
give them, as one process cuts them; batch ``start + k`` goes to process ``k % W``. Alone, the
process walks the sources as it reads (nothing is listed ahead). Under a launcher, the first
process walks them once and sends each process the paths of its batches, which it keeps in a
file of its own, so no process holds the whole list; then in every round each process
classifies one batch and the round's rows come to the first process, which writes them in
order. The rows are those of a one-process run, byte for byte.
"""
from __future__ import annotations

import contextlib
import math
import os
import pickle
import sys
import tempfile
from dataclasses import dataclass
from itertools import islice
from typing import Callable, Iterator, Optional, Sequence

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..run.distributed import DistEnv, all_gather_objects, broadcast_object, on_rank_zero
from ..run.progress import ProgressBar
from .classifier import DVTClassifier, Prediction
from .output import PredictionSummary, PredictionWriter, output_format
from .resume import KeptRows, check_continues, finish, kept_rows, open_partial, partial_path
from .sources import ImageBatch, _chunks, _keep, iter_image_paths, load_batch

GROUP = 256  # batches per message of the listing


@dataclass(frozen=True)
class PredictOptions:
    """output: the ``.csv``/``.jsonl`` file (None: CSV on stdout); topk: classes per row;
    batch_size, workers: images per batch and loader processes of each process; resume: continue
    the rows an interrupted run wrote; progress: show a progress bar (first process)."""
    output: Optional[str]
    topk: int = 0
    batch_size: int = 64
    workers: int = 0
    resume: bool = False
    progress: bool = False


class DealtBatches(IterableDataset):
    """This process's batches, read and transformed: from ``listing`` (the pickled path lists
    the first process dealt it), or, alone, every batch of ``sources`` from batch ``start`` on.
    Loader worker ``w`` of ``W`` reads batches ``w, w + W, ...``, so they arrive in order."""

    def __init__(self, transform: Callable, sources: Sequence[str] = (), batch_size: int = 1, start: int = 0,
                 listing: Optional[str] = None) -> None:
        self.transform, self.sources, self.batch_size = transform, list(sources), batch_size
        self.start, self.listing = start, listing

    def _paths(self) -> Iterator[list[str]]:
        if self.listing is None:
            yield from islice(_chunks(iter_image_paths(self.sources), self.batch_size), self.start, None)
            return
        with open(self.listing, "rb") as f:
            while True:
                try:
                    yield pickle.load(f)
                except EOFError:
                    return

    def __iter__(self) -> Iterator[ImageBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for k, paths in enumerate(self._paths()):
            if k % workers == worker:
                yield load_batch(paths, self.transform)


def _list_and_send(sources: Sequence[str], batch_size: int, start: int, kept: KeptRows,
                   keep: Callable[[int, list], None]) -> int:
    """The first process: walk the sources once, check the kept rows, send every group of
    batches to all; the number of batches."""
    total, group, first = 0, [], start
    for k, paths in enumerate(_chunks(iter_image_paths(sources), batch_size)):
        total = k + 1
        if k == start - 1:
            check_continues(kept, paths[-1])
        if k >= start:
            group.append(paths)
        if len(group) == GROUP:
            broadcast_object(("batches", (first, group)))
            keep(first, group)
            first, group = first + GROUP, []
    if total < start:
        check_continues(kept, None)
    if group:
        broadcast_object(("batches", (first, group)))
        keep(first, group)
    broadcast_object(("end", total))
    return total


def deal_batches(sources: Sequence[str], batch_size: int, env: DistEnv, start: int, kept: KeptRows,
                 listing: str) -> int:
    """Write this process's batches (from batch ``start`` on) to ``listing``, as the first
    process lists and sends them; the number of batches of the sources. An error of the listing
    is raised on every process."""
    with open(listing, "wb") as f:
        def keep(first: int, group: list) -> None:
            for k, paths in enumerate(group, first):
                if (k - start) % env.world_size == env.rank:
                    pickle.dump(paths, f)

        if env.is_main:
            try:
                return _list_and_send(sources, batch_size, start, kept, keep)
            except Exception as e:
                broadcast_object(("error", e))
                raise
        while True:
            kind, payload = broadcast_object(None)
            if kind == "batches":
                keep(*payload)
            elif kind == "end":
                return payload
            else:
                raise payload


def _rounds(clf: DVTClassifier, loader: DataLoader, env: DistEnv, rounds: Optional[int], topk: int,
            queue: int) -> Iterator[list[Prediction]]:
    """The rows of every batch in input order (on the first process; the others take part in
    gathering them): each round, every process gives the rows of its next batch, the images
    its batches send on to a later stage waiting for ``queue`` of them
    (:meth:`DVTClassifier.classify_stream`)."""
    answers, done = clf.classify_stream(loader, topk, queue=queue), 0  # no collective inside: rows by round
    while rounds is None or done < rounds:
        rows = next(answers, None)
        if rows is None and rounds is None:
            return
        done += 1
        yield from all_gather_objects(rows or [])


def _single_start(sources: Sequence[str], batch_size: int, kept: KeptRows) -> None:
    """Alone: check that the sources give the last kept row's image at its place."""
    start = kept.rows // batch_size
    if start:
        last = next(islice(_chunks(iter_image_paths(sources), batch_size), start - 1, None), None)
        check_continues(kept, last[-1] if last else None)


def predict_files(clf: DVTClassifier, sources: Sequence[str], env: DistEnv, opts: PredictOptions,
                  summary: PredictionSummary) -> None:
    """Classify every image of ``sources`` and write one row each (first process), counting
    them in ``summary``; with ``opts.resume``, after the rows an interrupted run kept."""
    fmt = output_format(opts.output)
    resumes = opts.resume and opts.output is not None
    kept = on_rank_zero(lambda: kept_rows(opts.output, fmt, opts.topk, opts.batch_size, summary) if resumes
                        else KeptRows())
    start = kept.rows // opts.batch_size
    listing, rounds = None, None
    try:
        if env.distributed:
            fd, listing = tempfile.mkstemp(prefix=f"dvt-predict-rank{env.rank}-", suffix=".pkl")
            os.close(fd)
            rounds = math.ceil((deal_batches(sources, opts.batch_size, env, start, kept, listing) - start)
                               / env.world_size)
        else:
            _single_start(sources, opts.batch_size, kept)
        data = DealtBatches(clf.transform, sources, opts.batch_size, start, listing)
        loader = DataLoader(data, batch_size=None, num_workers=opts.workers, collate_fn=_keep,
                            pin_memory=clf.device.type == "cuda")
        _write(clf, loader, env, rounds, opts, fmt, kept, summary)
    finally:
        if listing is not None:
            os.unlink(listing)


def _write(clf: DVTClassifier, loader: DataLoader, env: DistEnv, rounds: Optional[int], opts: PredictOptions,
           fmt: str, kept: KeptRows, summary: PredictionSummary) -> None:
    """Run the rounds; the first process writes the rows to the partial file (or stdout) and,
    once all are written, renames it to the output."""
    writer: contextlib.AbstractContextManager = contextlib.nullcontext()
    if env.is_main:
        target = None if opts.output is None else partial_path(opts.output)
        append = opts.output is not None and open_partial(opts.output, kept)
        writer = PredictionWriter(target, opts.topk, fmt, append)
    bar = ProgressBar(unit="img", desc="predict", disable=not opts.progress, leave=False, file=sys.stderr)
    with writer as out, bar:
        for rows in _rounds(clf, loader, env, rounds, opts.topk, opts.batch_size):
            if out is not None:
                out.write_many(rows)
                summary.add(rows)
                bar.update(len(rows))
    if env.is_main and opts.output is not None:
        finish(opts.output)

"""Predictions to a file, one row per image, and the summary of a run.

The format follows the file's suffix: ``.csv`` (a header, then one row per image; top-k as
columns ``top1_index, top1_name, top1_prob, top2_index, ...``) or ``.jsonl`` (one JSON object
per line; top-k as lists). Columns: ``path, class_index, class_name, confidence, exit,
gflops``, the top-k columns when asked, and ``error`` (empty unless the image could not be
read; then the other columns are empty).
"""
from __future__ import annotations

import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import IO, Optional, Sequence

from ..errors import ConfigError
from .classifier import Prediction

FORMATS = {".csv": "csv", ".jsonl": "jsonl"}
BASE_COLUMNS = ("path", "class_index", "class_name", "confidence", "exit", "gflops")


def output_format(path: Optional[str | os.PathLike]) -> str:
    """``csv`` or ``jsonl`` from the suffix of ``path`` (None: csv to stdout), after checking
    that the file can be created."""
    if path is None:
        return "csv"
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; name a {' or '.join(FORMATS)} file (e.g. {path / 'preds.csv'})")
    if fmt is None:
        raise ConfigError(f"the predictions file must end in {' or '.join(FORMATS)}, got {path}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"folder {parent} does not exist (for {path})")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(f"cannot write {path}: permission denied")
    return fmt


def columns(topk: int) -> list[str]:
    top = [f"top{i}_{what}" for i in range(1, topk + 1) for what in ("index", "name", "prob")]
    return [*BASE_COLUMNS, *top, "error"]


def record_keys(fmt: str, topk: int) -> list[str]:
    """The columns (CSV) or keys (JSON lines) of every row, in order."""
    if fmt == "csv":
        return columns(topk)
    return [*BASE_COLUMNS, "error", *(("topk_index", "topk_name", "topk_prob") if topk else ())]


def row_of(p: Prediction, topk: int) -> dict:
    """The flat record of one prediction (CSV columns; JSON lists for top-k when ``topk`` < 0)."""
    row = {"path": p.path, "class_index": p.index, "class_name": p.name,
           "confidence": None if p.confidence is None else round(p.confidence, 6), "exit": p.exit,
           "gflops": p.gflops}
    for i in range(topk):
        have = i < len(p.topk_index)
        row[f"top{i + 1}_index"] = p.topk_index[i] if have else None
        row[f"top{i + 1}_name"] = p.topk_name[i] if have else None
        row[f"top{i + 1}_prob"] = round(p.topk_prob[i], 6) if have else None
    row["error"] = p.error
    return row


class PredictionWriter:
    """Writes predictions as they come (flushed after every :meth:`write_many`), so an
    interrupted run keeps the rows it finished.

    Args:
        path: the ``.csv`` or ``.jsonl`` file, or None for CSV on stdout.
        topk: number of top-k classes per row (0: none).
        fmt: ``csv`` or ``jsonl`` (default: from the suffix of ``path``).
        append: add rows after those the file has (no header), as a resumed run does.
    """

    def __init__(self, path: Optional[str | os.PathLike], topk: int = 0, fmt: Optional[str] = None,
                 append: bool = False) -> None:
        self.format = fmt or output_format(path)
        self.topk = topk
        self._file: IO[str] = sys.stdout if path is None else open(path, "a" if append else "w", newline="",
                                                                    encoding="utf-8")
        self._owned = path is not None
        self._csv = None
        if self.format == "csv":
            self._csv = csv.DictWriter(self._file, fieldnames=columns(topk))
            if not append:
                self._csv.writeheader()

    def write_many(self, predictions: Sequence[Prediction]) -> None:
        for p in predictions:
            if self._csv is not None:
                self._csv.writerow({k: "" if v is None else v for k, v in row_of(p, self.topk).items()})
            else:
                record = row_of(p, 0)
                if self.topk:
                    record.update(topk_index=list(p.topk_index), topk_name=list(p.topk_name),
                                  topk_prob=[round(v, 6) for v in p.topk_prob])
                self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._owned:
            self._file.close()

    def __enter__(self) -> "PredictionWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PredictionSummary:
    """Counts of a run: images, unreadable files, exits, GFLOPs spent, wall time."""

    def __init__(self, num_exits: int) -> None:
        self.exit_counts = [0] * num_exits
        self.images = 0
        self.errors = 0
        self.gflops = 0.0
        self.kept = 0
        self.start = time.perf_counter()

    def add(self, predictions: Sequence[Prediction]) -> None:
        for p in predictions:
            if p.error is not None:
                self.errors += 1
                continue
            self.images += 1
            self.exit_counts[p.exit - 1] += 1
            self.gflops += p.gflops

    def add_kept(self, exit: Optional[int], gflops: Optional[float], error: bool) -> None:
        """Count a row an interrupted run wrote (exit from 1; unreadable when ``error``); it
        counts as an image, not as work of this run."""
        self.kept += 1
        if error:
            self.errors += 1
            return
        self.images += 1
        self.exit_counts[exit - 1] += 1
        self.gflops += gflops

    @property
    def mean_gflops(self) -> float:
        return self.gflops / self.images if self.images else 0.0

    @property
    def exit_shares(self) -> list[float]:
        return [c / self.images if self.images else 0.0 for c in self.exit_counts]

    def line(self, budget: Optional[float] = None, expected: Optional[float] = None) -> str:
        """``summary : N images (E unreadable), mean G GFLOPs/image (...), exit shares [...], R img/s``."""
        seconds = time.perf_counter() - self.start
        against = []
        if budget is not None:
            against.append(f"budget {budget:g}")
        if expected is not None:
            against.append(f"expected {expected:.6g}")
        against_text = f" ({'; '.join(against)})" if against else ""
        shares = "[" + ", ".join(f"{s:.3f}" for s in self.exit_shares) + "]"
        kept = f" ({self.kept} of them kept from the interrupted run)" if self.kept else ""
        return (f"summary : {self.images} images ({self.errors} unreadable), mean {self.mean_gflops:.6g} "
                f"GFLOPs/image{against_text}, exit shares {shares}, "
                f"{(self.images + self.errors - self.kept) / max(seconds, 1e-9):.1f} img/s{kept}")

"""The predictions file of a --predict run: written under a ``.partial`` name and renamed when
complete, refused when it exists (unless resumed or overwritten), and continued after an
interruption from the rows already written.

A run killed at any moment leaves whole rows, perhaps followed by a part of one. Resuming keeps
the whole rows up to the last full batch (the batches a run makes depend only on the batch size,
so those rows are exactly what an uninterrupted run writes), drops the rest and classifies from
the next batch on: the finished file is byte for byte the file of an uninterrupted run.
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

from ..errors import ConfigError
from .output import PredictionSummary, record_keys

PARTIAL = ".partial"


def partial_path(output: str | os.PathLike) -> Path:
    """Where the rows of a run into ``output`` go until it is complete."""
    return Path(f"{os.fspath(output)}{PARTIAL}")


def refuse_existing(output: Optional[str], resume: bool, overwrite: bool) -> None:
    """Stop, changing nothing, when ``output`` or its partial file exists and neither --resume
    nor --overwrite says what to do with it."""
    if output is None or resume or overwrite:
        return
    for path, what in ((partial_path(output), "the rows of an interrupted run"), (Path(output), "a file")):
        if path.exists():
            raise ConfigError(f"{path} exists ({what}): --resume to continue it, --overwrite to start over")


class KeptRows(NamedTuple):
    """What a resumed run keeps: the file holding the rows (None: start afresh), how many rows
    and how many bytes of it (header included), and the ``path`` of the last kept row."""
    source: Optional[Path] = None
    rows: int = 0
    size: int = 0
    last_path: Optional[str] = None


def _records(data: io.BufferedReader, fmt: str) -> Iterator[tuple[bytes, int]]:
    """Every whole record (CSV: a quoted field may hold line breaks) with the byte offset of
    its end; a partial last line is not one."""
    record, end = b"", 0
    for line in data:
        end += len(line)
        if not line.endswith(b"\n"):
            return
        record += line
        if fmt == "csv" and record.count(b'"') % 2:
            continue  # inside a quoted field
        yield record, end
        record = b""


def _parse(record: bytes, fmt: str, keys: list[str]) -> dict:
    if fmt == "jsonl":
        return json.loads(record)
    return dict(zip(keys, next(csv.reader(io.StringIO(record.decode("utf-8"), newline="")))))


def kept_rows(output: str, fmt: str, topk: int, batch_size: int, summary: PredictionSummary) -> KeptRows:
    """The rows to keep of the file an interrupted run into ``output`` left (its partial file,
    else ``output`` itself), counted into ``summary``; nothing is changed yet.

    Args:
        output: the predictions file.
        fmt: ``csv`` or ``jsonl``.
        topk: the top-k classes of this run's rows (the kept rows must have the same columns).
        batch_size: rows per batch: whole batches are kept.
        summary: receives the kept rows.
    """
    source = next((p for p in (partial_path(output), Path(output)) if p.exists()), None)
    if source is None:
        return KeptRows()
    keys = record_keys(fmt, topk)
    header = ",".join(keys).encode() + b"\r\n" if fmt == "csv" else b""
    with open(source, "rb") as f:
        first = f.readline() if header else b""
        if first != header:
            if first.endswith(b"\n"):
                raise ConfigError(f"{source} has other columns than this run writes (another --topk?): "
                                  "--overwrite to start over")
            return KeptRows(source)  # not even a whole header: nothing to keep
        count = sum(1 for _ in _records(f, fmt))
    keep = count // batch_size * batch_size
    size, last = len(header), None
    with open(source, "rb") as f:
        f.seek(len(header))
        for _, (record, end) in zip(range(keep), _records(f, fmt)):
            row = _parse(record, fmt, keys)
            if list(row) != keys:
                raise ConfigError(f"{source} has other columns than this run writes (another --topk?): "
                                  "--overwrite to start over")
            summary.add_kept(int(row["exit"]) if row["exit"] not in ("", None) else None,
                             float(row["gflops"]) if row["gflops"] not in ("", None) else None,
                             row["error"] not in ("", None))
            size, last = len(header) + end, row["path"]
    return KeptRows(source, keep, size, last)


def check_continues(kept: KeptRows, path_there: Optional[str]) -> None:
    """The sources give the last kept row's image at its place (``path_there``), or stop."""
    if kept.rows and path_there != kept.last_path:
        raise ConfigError(f"{kept.source} does not continue these images: its row {kept.rows} is {kept.last_path}, "
                          f"the sources give {path_there} there: --overwrite to start over")


def open_partial(output: str, kept: KeptRows) -> bool:
    """Make ``output``'s partial file hold the kept rows and nothing more (the whole header when
    no row is kept); True when rows follow them (append), False for a file to write afresh."""
    partial = partial_path(output)
    if kept.source is not None and kept.rows:
        if kept.source != partial:
            os.replace(kept.source, partial)
        os.truncate(partial, kept.size)
        return True
    return False


def finish(output: str) -> None:
    """The complete partial file becomes ``output`` (replacing it at once)."""
    os.replace(partial_path(output), output)

"""What a run records besides its checkpoints: the log (rank 0 on stdout, and ``log.txt`` in
the run folder) and ``summary.csv``, one row of metrics per epoch."""
from __future__ import annotations

import csv
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

_logger = logging.getLogger("dvt.train")

LOG_FORMAT = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")


def setup_logging(is_main: bool) -> list[logging.Handler]:
    """Rank 0 logs to stdout; other ranks only warnings."""
    _logger.setLevel(logging.INFO if is_main else logging.WARNING)
    _logger.propagate = False
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(LOG_FORMAT)
    _logger.addHandler(handler)
    return [handler]


def add_file_log(path: Path) -> logging.Handler:
    """The log written to ``path`` as well."""
    handler = logging.FileHandler(path)
    handler.setFormatter(LOG_FORMAT)
    _logger.addHandler(handler)
    return handler


def remove_logging(handlers: Sequence[logging.Handler]) -> None:
    for h in handlers:
        _logger.removeHandler(h)
        h.close()


class CsvSummary:
    """summary.csv: one row per epoch; the columns are fixed by the first row written."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, row: dict[str, Any]) -> None:
        new = not self.path.is_file()
        fields = list(row)
        if not new:
            with open(self.path, newline="") as f:
                fields = next(csv.reader(f), fields)
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)


def prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    """Metrics as summary columns named ``{prefix}{name}``, without those the row holds once
    (learning rate, speed) or not at all (samples; top1/top5, the last exit's again)."""
    return {f"{prefix}{k}": v for k, v in metrics.items() if k not in ("samples", "img_per_s", "lr", "top1", "top5")}

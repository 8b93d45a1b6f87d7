"""What a run records besides its checkpoints: the log (rank 0 on stdout, and ``log.txt`` in
the run folder), ``summary.csv`` (one row of metrics per epoch) and, with ``--tensorboard``, the
same rows as TensorBoard scalars in ``tensorboard/``."""
from __future__ import annotations

import csv
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

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


TENSORBOARD_DIR = "tensorboard"
# summary.csv columns -> TensorBoard tags: the prefix picks the section, the rest names the scalar.
_SECTIONS = (("ema_eval_", "val_ema/"), ("eval_", "val/"), ("train_", "train/"), ("", ""))


def tensorboard_tag(column: str) -> str:
    """``train_exit1_loss`` -> ``train/exit1_loss``, ``eval_dynamic_top1_p10`` ->
    ``val/dynamic_top1_p10``, ``lr`` -> ``lr``."""
    for prefix, section in _SECTIONS:
        if column.startswith(prefix):
            return section + column[len(prefix):]
    return column


class TensorBoardLog:
    """The epoch rows of ``summary.csv`` as TensorBoard scalars, step = epoch, in
    ``folder/tensorboard``. A resumed run appends to the same folder: events from its first
    epoch on that an interrupted run had written are dropped (``purge_step``), so no step is
    recorded twice.

    Args:
        folder: the run folder.
        first_epoch: the epoch this process starts at.
    """

    def __init__(self, folder: Path, first_epoch: int) -> None:
        from torch.utils.tensorboard import SummaryWriter  # optional dependency, checked before the run

        self.writer = SummaryWriter(str(Path(folder) / TENSORBOARD_DIR), purge_step=first_epoch)

    def write(self, row: dict[str, Any]) -> None:
        epoch = int(row["epoch"])
        for column, value in row.items():
            if column != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(tensorboard_tag(column), value, epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def tensorboard_missing() -> Optional[str]:
    """Why ``--tensorboard`` cannot run here (the package is not installed), or None."""
    if importlib.util.find_spec("tensorboard") is None:
        return "--tensorboard needs the tensorboard package: pip install -r requirements-deploy.txt"
    return None

"""Progress bars that start no thread and iterate what they wrap once.

A plain tqdm bar starts (and, once no bar is left, stops) tqdm's monitor thread. A DataLoader
forks its workers right after the bar is made, and on Python 3.11 a fork taken while another
thread is starting or ending can leave the child locked for ever inside ``os.fork`` (it waits
for the interpreter's thread-list lock, held at the fork by that thread): the worker never
serves a batch and the run hangs. Our bars never start that thread.

They are ``tqdm.autonotebook``'s (a notebook's bar in Jupyter, the terminal's elsewhere), not
``tqdm.auto``'s: its asyncio layer calls ``iter()`` on the iterable as the bar is made, and
iterating the bar calls it again, so a DataLoader wrapped in it started two sets of workers (the
first never read, alive until the bar was collected: with a worker's error that took 10 s).

Off a terminal (a SLURM log, a pipe, a file) a bar is a plain line at most once a minute
(``DVT_PROGRESS_INTERVAL`` seconds when set): a terminal's bar redraws itself with carriage
returns several times a second, which a log file keeps as one line growing by thousands of copies."""
from __future__ import annotations

import os
import re
import sys
import warnings
from contextlib import contextmanager

from tqdm.std import TqdmExperimentalWarning

with warnings.catch_warnings():  # its notice that Jupyter gets the notebook's bar
    warnings.simplefilter("ignore", category=TqdmExperimentalWarning)
    from tqdm.autonotebook import tqdm


LINE_INTERVAL = 60.0  # seconds between the lines of a bar written to a log, unless DVT_PROGRESS_INTERVAL says
_IN_NOTEBOOK = tqdm.__module__ == "tqdm.notebook"  # a notebook's bar is a widget, whatever its file


class ProgressBar(tqdm):
    """``tqdm.autonotebook.tqdm`` without the monitor thread (it only forces a refresh of bars
    that have not printed for ``maxinterval`` seconds). Where its file (standard error unless
    given) is not a terminal, it writes ``desc: n/total (p%), elapsed, left, rate`` lines, the
    first after :func:`line_interval` seconds and then at most one per interval."""

    monitor_interval = 0

    def __init__(self, *args, **kwargs) -> None:
        file = kwargs.get("file") or sys.stderr
        lines = not _IN_NOTEBOOK and not kwargs.get("disable") and not _is_terminal(file)
        if lines:
            kwargs.update(file=_Lines(file), dynamic_ncols=False, ncols=None,
                          bar_format=_line_format(_total(args, kwargs)))
            kwargs.setdefault("mininterval", line_interval())
            kwargs.setdefault("delay", kwargs["mininterval"])
        super().__init__(*args, **kwargs)


def line_interval() -> float:
    """Seconds between the lines of a bar off a terminal: ``DVT_PROGRESS_INTERVAL`` (a number of
    seconds, 0 for a line per step), else ``LINE_INTERVAL``."""
    value = os.environ.get("DVT_PROGRESS_INTERVAL", "").strip()
    if not value:
        return LINE_INTERVAL
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        warnings.warn(f"DVT_PROGRESS_INTERVAL={value!r} is not a number of seconds: progress lines every "
                      f"{LINE_INTERVAL:g} s", stacklevel=2)
        return LINE_INTERVAL
    return seconds


def _total(args: tuple, kwargs: dict):
    """The bar's total as tqdm takes it: ``total``, else the length of the iterable, else None."""
    if kwargs.get("total") is not None:
        return kwargs["total"]
    iterable = args[0] if args else kwargs.get("iterable")
    try:
        return len(iterable)
    except TypeError:
        return None


def _line_format(total) -> str:
    if total:
        return "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%), {elapsed} elapsed, {remaining} left, {rate_fmt}"
    return "{desc}: {n_fmt} {unit}, {elapsed} elapsed, {rate_fmt}"


def _is_terminal(file) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


class _Lines:
    """A log's view of a bar: each redraw as a line of its own, without the carriage returns,
    cursor moves and padding a terminal bar redraws itself with (an empty redraw, which clears
    a closing bar on a terminal, writes nothing; tqdm pads the rate to a fixed width)."""

    def __init__(self, file) -> None:
        self.file = file

    def write(self, text: str) -> None:
        text = re.sub(" {2,}", " ", text.replace("\r", "").replace("\x1b[A", "")).strip()
        if text:
            self.file.write(text + "\n")

    def flush(self) -> None:
        getattr(self.file, "flush", lambda: None)()


@contextmanager
def bars_cleared_on_error():
    """Close every bar still on screen when an exception leaves the block, so the message that
    follows (``interrupted``, ``error: ...``) starts its own line. A bar iterated inside a
    generator is otherwise closed only when that generator is collected, which the exception's
    traceback delays until after the message."""
    try:
        yield
    except BaseException:
        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
        raise

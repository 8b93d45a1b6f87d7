"""Progress bars that start no thread and iterate what they wrap once.

A plain tqdm bar starts (and, once no bar is left, stops) tqdm's monitor thread. A DataLoader
forks its workers right after the bar is made, and on Python 3.11 a fork taken while another
thread is starting or ending can leave the child locked for ever inside ``os.fork`` (it waits
for the interpreter's thread-list lock, held at the fork by that thread): the worker never
serves a batch and the run hangs. Our bars never start that thread.

They are ``tqdm.autonotebook``'s (a notebook's bar in Jupyter, the terminal's elsewhere), not
``tqdm.auto``'s: its asyncio layer calls ``iter()`` on the iterable as the bar is made, and
iterating the bar calls it again, so a DataLoader wrapped in it started two sets of workers (the
first never read, alive until the bar was collected: with a worker's error that took 10 s)."""
from __future__ import annotations

import warnings
from contextlib import contextmanager

from tqdm.std import TqdmExperimentalWarning

with warnings.catch_warnings():  # its notice that Jupyter gets the notebook's bar
    warnings.simplefilter("ignore", category=TqdmExperimentalWarning)
    from tqdm.autonotebook import tqdm


class ProgressBar(tqdm):
    """``tqdm.autonotebook.tqdm`` without the monitor thread (it only forces a refresh of bars
    that have not printed for ``maxinterval`` seconds)."""

    monitor_interval = 0


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

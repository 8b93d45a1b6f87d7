"""Progress bars that start no thread.

A plain tqdm bar starts (and, once no bar is left, stops) tqdm's monitor thread. A DataLoader
forks its workers right after the bar is made, and on Python 3.11 a fork taken while another
thread is starting or ending can leave the child locked for ever inside ``os.fork`` (it waits
for the interpreter's thread-list lock, held at the fork by that thread): the worker never
serves a batch and the run hangs. Our bars never start that thread."""
from __future__ import annotations

from tqdm.auto import tqdm


class ProgressBar(tqdm):
    """``tqdm.auto.tqdm`` without the monitor thread (it only forces a refresh of bars that
    have not printed for ``maxinterval`` seconds)."""

    monitor_interval = 0

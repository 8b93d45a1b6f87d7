"""SIGTERM / SIGINT that end a piece of work at once instead of at the next training step.

The training loop turns these signals into a request read between steps, so it can save a
resumable checkpoint. Work outside the loop (the release export after the last epoch) has no
such point to stop at and nothing to save, so there the signal ends it right away: the
handler raises :class:`Interrupted`, unwinding through the atomic writes, which leave no
partial file.
"""
from __future__ import annotations

import contextlib
import signal
import sys
from typing import Iterator, Optional

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
    """A stop signal arrived during work that stops at once."""

    def __init__(self, signum: int, detail: str = "") -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}{detail}")
        self.signum = signum


@contextlib.contextmanager
def signals_raise(pending: Optional[int] = None) -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise :class:`Interrupted` (main thread only).

    Args:
        pending: a signal received before the block (e.g. noted by a stop flag): raise at once.
    """
    if pending:
        raise Interrupted(pending)

    def handler(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def quiet_lost_main_process() -> None:
    """In a loader worker: stay silent when the main process has gone.

    A worker hands tensors to the main process through a helper thread; when Ctrl-C or a
    stop ends the main process while that thread is serving, the broken connection surfaces
    as a traceback printed by the worker, after the command's own one-line message. Errors of
    the worker's real work travel to the main process through the loader, not through this
    hook, so only the lost connections (``OSError``, ``EOFError``) are dropped here.
    """
    previous = sys.excepthook

    def hook(exc_type, exc, tb) -> None:
        if not issubclass(exc_type, (OSError, EOFError)):
            previous(exc_type, exc, tb)

    sys.excepthook = hook

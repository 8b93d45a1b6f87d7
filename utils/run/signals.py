"""SIGTERM and SIGINT (Ctrl-C): every way a command reacts to them.

- Training turns them into a request read between steps (:class:`StopSignal`), so it can save a
  resumable checkpoint.
- Work outside the loop (the release export after the last epoch) has no such point to stop at
  and nothing to save, so there the signal ends it right away (:func:`signals_raise` raises
  :class:`Interrupted`, unwinding through the atomic writes, which leave no partial file).
- Evaluation and prediction stop on Ctrl-C with one line (:data:`CTRL_C`), also while loader
  workers start.
- Loader workers leave the signals to the main process (:func:`worker_ignores_signals`) and stay
  silent when it has gone (:func:`quiet_lost_main_process`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from typing import Any, Iterator, Optional, Sequence

_logger = logging.getLogger("dvt.train")

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


def worker_ignores_signals(worker_id: int, signals: Sequence[int] = SIGNALS) -> None:
    """``worker_init_fn`` of a DataLoader: the worker ignores ``signals`` (Slurm and Ctrl-C
    signal every process; a worker killed by one would make the loader fail before the main
    process could react) and stays silent when the main process has gone."""
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)
    quiet_lost_main_process()


class StopSignal:
    """Turns SIGTERM and SIGINT into a request to stop at the next step boundary, so the run
    can save a resumable checkpoint.

    Args:
        escalate: a second signal then acts as usual (the process dies at once). Leave it off
            under a launcher: torchrun forwards the signal it receives to the workers, which
            have usually received it already, and kills them itself after its grace period.
    """

    def __init__(self, escalate: bool = True) -> None:
        self.escalate = escalate
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.signum is None
        self.signum = self.signum or signum
        if self.escalate:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
        if first:
            again = " (send it again to stop at once)" if self.escalate else ""
            _logger.warning(f"{signal.Signals(signum).name} received: stopping after this step "
                            f"with a resumable checkpoint{again}")

    def __enter__(self) -> "StopSignal":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None


class CtrlC:
    """The SIGINT handler of evaluation and prediction: KeyboardInterrupt in the main process,
    except while loader workers are being forked, where it waits until they are up (a
    KeyboardInterrupt inside Python's fork hooks is printed as a traceback and then lost). A
    forked worker that inherits a signal the main process had not handled yet ignores it."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.forking = False
        self.pending = False

    def __call__(self, signum: int, frame: Any) -> None:
        if os.getpid() != self.pid:
            return
        if self.forking:
            self.pending = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """Hold a Ctrl-C back during the block; raise it after."""
        self.forking, self.pending = True, False
        try:
            yield
        finally:
            self.forking = False
        if self.pending:
            raise KeyboardInterrupt


CTRL_C = CtrlC()

"""Signal handling for the span of a block: how a job hears that Snakemake or SLURM stops it
(:func:`handling_sigterm`), and work that a signal must not cut in two (:func:`deferred`)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def handling_sigterm(handler: Callable[[int, Any], None]) -> Iterator[Any]:
    """``handler`` answers SIGTERM inside the block and the previous handler comes back after
    it; yields that previous handler. In a thread other than the main one, where Python cannot
    set handlers, signals are left alone and None is yielded."""
    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield None
        return
    try:
        yield previous
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def deferred(signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Signals (Ctrl-C's SIGINT, SIGTERM) that arrive inside the block take effect when it
    ends, through the handlers that were there before it (KeyboardInterrupt, a tracked run's
    KILLED, a checkpoint request, or the default action); a second one takes effect at once.

    For work a signal must not cut in two: a write to the MLflow store, whose transaction,
    interrupted, keeps an SQLite database locked against this process's own next write (the
    one that ends its run KILLED, which then waited minutes for the lock). In a thread other
    than the main one, where signals do not arrive, the block just runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous: dict[int, Any] = {}

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def note(signum: int, frame: Any) -> None:
        caught.append(signum)
        if len(caught) > 1:  # asked twice: now, in the order they came
            restore()
            pending = list(caught)
            caught.clear()
            for each in pending:
                _deliver(each, previous[each])

    for signum in signums:
        previous[signum] = signal.signal(signum, note)
    try:
        yield
    finally:
        restore()
        for signum in caught:
            _deliver(signum, previous[signum])


def _deliver(signum: int, handler: Any) -> None:
    """What ``signum`` would have done under ``handler`` (restored beforehand)."""
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signum)

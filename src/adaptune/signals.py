"""SIGTERM handlers for the span of a block: how a job hears that Snakemake or SLURM stops it."""

from __future__ import annotations

import contextlib
import signal
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

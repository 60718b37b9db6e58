"""Holding Ctrl-C back across the few steps that must happen together.

Placing a job is: write its payload, note it in the worker's queue, send its header. A
KeyboardInterrupt between the last two would leave a job the worker never hears of, or a header
for a job the pool forgot. Python raises KeyboardInterrupt only in the main thread, between
bytecodes, so there, and only while Python's own handler is installed, the handler is swapped
for one that notes the signal; the interrupt is raised once the steps are done.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_MAIN_THREAD_ID = threading.main_thread().ident


def interruptible() -> bool:
    """Whether a KeyboardInterrupt can land in this thread (the main one; cheap to ask)."""
    return threading.get_ident() == _MAIN_THREAD_ID


@contextmanager
def deferred_interrupt() -> Iterator[None]:
    if not interruptible() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    caught: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if caught:
            raise KeyboardInterrupt

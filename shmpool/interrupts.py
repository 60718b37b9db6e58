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

try:
    # signal.signal() and getsignal() convert numbers and handlers to enums and back, which
    # costs more than the placement they guard; the C functions underneath take plain ints.
    # Checked against CPython 3.10-3.13, where signal.py wraps exactly these.
    from _signal import getsignal as _getsignal, signal as _setsignal
except ImportError:  # pragma: no cover - another implementation
    _getsignal, _setsignal = signal.getsignal, signal.signal

_MAIN_THREAD_ID = threading.main_thread().ident
_SIGINT = int(signal.SIGINT)


def interruptible() -> bool:
    """Whether a KeyboardInterrupt can land in this thread (the main one; cheap to ask)."""
    return threading.get_ident() == _MAIN_THREAD_ID


class deferred_interrupt:
    """``with deferred_interrupt(): ...`` holds Ctrl-C back for the block (a class, not a
    generator: this runs for every job placed)."""

    __slots__ = ("_active", "_caught")

    def __enter__(self) -> "deferred_interrupt":
        self._active = interruptible() and _getsignal(_SIGINT) is signal.default_int_handler
        if self._active:
            self._caught = False
            _setsignal(_SIGINT, self._note)
        return self

    def _note(self, signum: int, frame: object) -> None:
        self._caught = True

    def __exit__(self, *exc: object) -> None:
        if self._active:
            _setsignal(_SIGINT, signal.default_int_handler)
            if self._caught:
                raise KeyboardInterrupt

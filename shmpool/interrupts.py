"""Holding signal handlers back across the few steps that must happen together.

Placing a job is: write its payload, note it in the worker's queue (or the pool's), send its
header. An exception between those steps would leave a job the worker never hears of (its
future, and every job queued behind it, would wait forever) or a header for a job the pool
forgot. Only Python-level signal handlers can raise there: ``KeyboardInterrupt`` from Ctrl-C,
a SIGTERM handler calling ``sys.exit``, a SIGALRM timeout. Python runs them in the main thread
only, between bytecodes, whichever thread the signal hit. So, in the main thread, every signal
with a Python handler gets a handler that only notes it for the block's duration; afterwards
the real handlers are put back and the noted signals are raised again, so their handlers run
(and may raise) right after the steps, as if the signals had come a moment later.

The same holds wherever a caller's thread holds the pool's lock (``PoolCore.guarded``): a
handler that calls into the pool (a SIGTERM handler calling ``shutdown()``) then runs once the
lock is free, instead of waiting for a lock its own thread holds.
"""
from __future__ import annotations

import ctypes
import signal
import threading
import time

try:
    # signal.signal() and getsignal() convert numbers and handlers to enums and back, which
    # costs more than the placement they guard; the C functions underneath take plain ints.
    # Checked against CPython 3.10-3.13, where signal.py wraps exactly these.
    from _signal import getsignal as _getsignal, signal as _setsignal
except ImportError:  # pragma: no cover - another implementation
    _getsignal, _setsignal = signal.getsignal, signal.signal

try:
    _raise = ctypes.PyDLL(None)["raise"]  # PyDLL: the GIL stays held, no signal check after
    _raise.argtypes = (ctypes.c_int,)
except (OSError, AttributeError):  # pragma: no cover - not glibc/musl
    _raise = signal.raise_signal
_MAIN_THREAD_ID = threading.main_thread().ident
# Every signal a Python handler can be set for (SIGKILL and SIGSTOP cannot be caught).
_CATCHABLE = tuple(int(s) for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP))
# Asking every signal for its handler costs 3-4 us, more than the rest of a submit's placement,
# so the signals with Python handlers are looked up again only this often (SIGINT always). A
# handler set since is not held back until then: an exception it raises inside a placement is
# taken back by the placement itself (core.PoolCore.place), and comes out of submit().
RESCAN_SECONDS = 0.05
_SIGINT = int(signal.SIGINT)
_handled: tuple[int, ...] = ()
_rescan_at = float("-inf")


def _python_handled() -> tuple[int, ...]:
    """The signals that had Python handlers at the last look (main thread only)."""
    global _handled, _rescan_at
    now = time.monotonic()
    if now >= _rescan_at:
        found = tuple(signum for signum in _CATCHABLE if callable(_getsignal(signum)))
        _handled = found if _SIGINT in found else (_SIGINT, *found)
        _rescan_at = now + RESCAN_SECONDS
    return _handled


class deferred_signals:
    """``with deferred_signals(): ...`` holds Python signal handlers back for the block (a
    class, not a generator: this runs for every job submitted)."""

    __slots__ = ("_swapped", "_caught")

    def __enter__(self) -> "deferred_signals":
        self._swapped: list[tuple[int, object]] = []
        if threading.get_ident() != _MAIN_THREAD_ID:
            return self  # no Python handler ever runs in this thread
        self._caught: list[int] = []
        swapped = self._swapped
        try:
            for signum in _python_handled():
                handler = _getsignal(signum)
                if callable(handler):
                    _setsignal(signum, self._note)
                    swapped.append((signum, handler))
        except BaseException:
            self._restore()  # a handler raised before its turn came: nothing is held yet
            raise
        return self

    def _note(self, signum: int, frame: object) -> None:
        self._caught.append(signum)

    def _restore(self) -> None:
        swapped, self._swapped = self._swapped, []
        for signum, handler in swapped:
            _setsignal(signum, handler)

    def __exit__(self, *exc: object) -> None:
        if not self._swapped:
            return
        self._restore()
        _raise_each(list(dict.fromkeys(self._caught)))


def _raise_each(signals: list[int], i: int = 0) -> None:
    """Raise ``signals`` again, to this thread, through libc with the GIL held: each only marks
    its handler due (Python's own signal functions would run it at once, nested in whatever
    called into the pool), and CPython runs it at its next check between bytecodes. Each next
    one is raised in a ``finally``: a handler that raises costs the others nothing."""
    if i < len(signals):
        try:
            _raise(signals[i])
        finally:
            _raise_each(signals, i + 1)

"""The future a job's caller holds: resolved exactly once, and nothing a callback does can
take the pool down.

``concurrent.futures.Future`` runs done-callbacks inside ``set_result``/``set_exception`` and
catches only ``Exception`` from them: a callback raising ``SystemExit`` (``sys.exit()``) or
``KeyboardInterrupt`` would escape into whichever thread resolved the future, the pool's
dispatcher included, and stop it resolving the futures after that one. A ``JobFuture`` runs
each callback guarded: what it raises is logged the way the standard library does, except a
``BaseException`` in the main thread (a Ctrl-C that landed in the callback, a ``sys.exit()``),
which stays the caller's; ``PoolCore.flush`` settles the other futures before letting it go on.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

log = logging.getLogger("concurrent.futures")  # where Future logs a failing callback


class JobFuture(Future):
    def add_done_callback(self, fn: Callable[[Future], object]) -> None:
        super().add_done_callback(_Guarded(fn))


class _Guarded:
    """A done-callback that never raises; named after the callback it runs (for reprs)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[Future], object]) -> None:
        self.fn = fn

    def __call__(self, future: Future) -> None:
        try:
            self.fn(future)
        except Exception:
            log.exception("exception calling callback for %r", future)
        except BaseException:
            if threading.current_thread() is threading.main_thread():
                raise  # the caller's own Ctrl-C or exit
            log.exception("exception calling callback for %r", future)

    def __repr__(self) -> str:
        return f"<guarded {self.fn!r}>"


def settle(future: Future, result: Any = None, exc: BaseException | None = None) -> bool:
    """Resolve a future unless it already is; True when this call resolved it. A future its
    caller cancelled is marked notified instead, so ``wait()`` and ``as_completed()`` see it
    (``cancel()`` alone wakes only ``result()``). Raises only what a done-callback run in the
    main thread raises beyond ``Exception`` (see the module's text)."""
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
        return True
    except Exception:  # InvalidStateError: already resolved, or cancel()led: the caller gave up
        pass
    try:
        future.set_running_or_notify_cancel()  # CANCELLED -> CANCELLED_AND_NOTIFIED
    except RuntimeError:
        pass  # resolved, or notified already
    return False

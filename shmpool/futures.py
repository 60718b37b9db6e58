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
    """``delivered_by``: the thread that resolves the pool's futures (and so runs most of their
    callbacks). Waiting in it for a future it has yet to resolve could never end: ``result()``
    and ``exception()`` raise RuntimeError there instead of hanging the pool."""

    def __init__(self, delivered_by: threading.Thread | None = None) -> None:
        super().__init__()
        self._delivered_by = delivered_by

    def add_done_callback(self, fn: Callable[[Future], object]) -> None:
        super().add_done_callback(_Guarded(fn))

    def result(self, timeout: float | None = None) -> Any:
        if self._delivered_by is not None and not self.done():
            self._refuse_to_wait_on_myself()
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._delivered_by is not None and not self.done():
            self._refuse_to_wait_on_myself()
        return super().exception(timeout)

    def _refuse_to_wait_on_myself(self) -> None:
        if threading.current_thread() is self._delivered_by:
            raise RuntimeError(
                "a done-callback waits for another job of the same pool: callbacks run on the pool's "
                "dispatcher thread, which is the one that delivers results, so this wait could never "
                "end; chain the next step with add_done_callback, or wait in another thread"
            )


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

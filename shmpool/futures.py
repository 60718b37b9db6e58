"""The future a job's caller holds: resolved exactly once, and nothing a callback does can
take the pool down.

``concurrent.futures.Future`` runs done-callbacks inside ``set_result``/``set_exception`` and
catches only ``Exception`` from them: a callback raising ``SystemExit`` (``sys.exit()``) or
``KeyboardInterrupt`` would escape into whichever thread resolved the future, the pool's
dispatcher included, and stop it resolving the futures after that one. A ``JobFuture`` runs
each callback guarded: what it raises is logged the way the standard library does, except a
``BaseException`` in the main thread (a Ctrl-C that landed in the callback, a ``sys.exit()``),
which stays the caller's; ``PoolCore.flush`` settles the other futures before letting it go on.

A ``JobFuture`` is also light: ``Future.__init__`` gives every future a ``threading.Condition``
(an RLock, a deque and five bound methods) and two lists, twelve objects the garbage collector
tracks. A burst of small jobs holds thousands of futures at once; in a process with torch
loaded (160k+ long-lived objects), that many new objects set off a full collection of about
100 ms every second burst of 3,000 jobs. A ``JobFuture`` holds two: itself and a small
condition over one lock shared by every JobFuture (the lock is only held to read or change a
future's state); its lists are made when first needed.
"""
from __future__ import annotations

import _thread
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, PENDING, RUNNING
from typing import Any

log = logging.getLogger("concurrent.futures")  # where Future logs a failing callback


_state_lock = threading.RLock()  # every JobFuture's condition; replaced in a forked child


def _fresh_state_lock() -> None:
    global _state_lock
    _state_lock = threading.RLock()  # another thread may have held it at the fork


os.register_at_fork(after_in_child=_fresh_state_lock)


class _Condition:
    """The part of ``threading.Condition`` that ``Future`` and ``concurrent.futures.wait()`` /
    ``as_completed()`` use, over the shared ``_state_lock``. A waiter sleeps on a lock of its
    own, made when it waits; ``notify_all`` wakes this future's waiters only, so a wake-up
    always means this future changed state (``Future.result`` waits once)."""

    __slots__ = ("_sleepers",)

    def __init__(self) -> None:
        self._sleepers: list[Any] | None = None

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return _state_lock.acquire(blocking, timeout)

    def release(self) -> None:
        _state_lock.release()

    def __enter__(self) -> bool:
        return _state_lock.acquire()

    def __exit__(self, *exc: object) -> None:
        _state_lock.release()

    def wait(self, timeout: float | None = None) -> bool:
        lock = _state_lock
        sleeper = _thread.allocate_lock()
        sleeper.acquire()
        if self._sleepers is None:
            self._sleepers = []
        self._sleepers.append(sleeper)
        saved = lock._release_save()  # type: ignore[attr-defined]  # all levels, as Condition.wait does
        woken = False
        try:
            if timeout is None:
                woken = sleeper.acquire()
            elif timeout > 0:
                woken = sleeper.acquire(True, timeout)
            else:
                woken = sleeper.acquire(False)
            return woken
        finally:
            lock._acquire_restore(saved)  # type: ignore[attr-defined]
            if not woken and self._sleepers is not None:
                try:
                    self._sleepers.remove(sleeper)
                except ValueError:
                    pass  # notified between the timeout and here

    def notify_all(self) -> None:
        sleepers, self._sleepers = self._sleepers, None
        for sleeper in sleepers or ():
            sleeper.release()


class JobFuture(Future):
    """``delivered_by``: the thread that resolves the pool's futures (and so runs most of their
    callbacks). Waiting in it for a future it has yet to resolve could never end: ``result()``,
    ``exception()``, ``wait()`` and ``as_completed()`` raise RuntimeError there instead of
    hanging the pool.

    The methods that ``Future`` implements over its lists are implemented here over lists made
    on first use, with the same behaviour."""

    def __init__(self, delivered_by: threading.Thread | None = None) -> None:
        # Future.__init__ is not called: see the module's text.
        self._condition = _Condition()
        self._state = PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        self._waiter_list: list[Any] | None = None
        self._callback_list: list[Callable[[Future], object]] | None = None
        self._delivered_by = delivered_by

    @property
    def _waiters(self) -> list[Any]:
        """Where ``concurrent.futures.wait()`` and ``as_completed()`` add their waiters (only
        they use it: this class's own methods use ``_waiter_list``). One that would wait in
        the thread that resolves this future is refused, as ``result()`` is."""
        if self._delivered_by is not None and self._state not in (FINISHED, CANCELLED_AND_NOTIFIED):
            self._refuse_to_wait_on_myself()
        if self._waiter_list is None:
            self._waiter_list = []
        return self._waiter_list

    @property
    def _done_callbacks(self) -> list[Callable[[Future], object]]:
        if self._callback_list is None:
            self._callback_list = []
        return self._callback_list

    def add_done_callback(self, fn: Callable[[Future], object]) -> None:
        guarded = _Guarded(fn)
        with self._condition:
            if self._state not in (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED):
                self._done_callbacks.append(guarded)
                return
        guarded(self)

    def _invoke_callbacks(self) -> None:
        for callback in self._callback_list or ():
            callback(self)  # guarded: raises only a main-thread BaseException (module text)

    def set_result(self, result: Any) -> None:
        self._finish(result, None, False)

    def set_exception(self, exception: BaseException | None) -> None:
        self._finish(None, exception, True)

    def _finish(self, result: Any, exception: BaseException | None, failed: bool) -> None:
        with self._condition:
            if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED):
                raise InvalidStateError(f"{self._state}: {self!r}")
            self._result = result
            self._exception = exception
            self._state = FINISHED
            for waiter in self._waiter_list or ():
                if failed:
                    waiter.add_exception(self)
                else:
                    waiter.add_result(self)
            self._condition.notify_all()
        self._invoke_callbacks()

    def set_running_or_notify_cancel(self) -> bool:
        with self._condition:
            if self._state == CANCELLED:
                self._state = CANCELLED_AND_NOTIFIED
                for waiter in self._waiter_list or ():
                    waiter.add_cancelled(self)
                return False  # cancel() already woke result()
            if self._state == PENDING:
                self._state = RUNNING
                return True
        log.critical("Future %s in unexpected state: %s", id(self), self._state)  # as Future does
        raise RuntimeError("Future in unexpected state")

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
    with future._condition:  # re-entrant: held across the check and the notice
        if future._state == CANCELLED:  # not notified yet (the placement may have, see core.place)
            future.set_running_or_notify_cancel()  # CANCELLED -> CANCELLED_AND_NOTIFIED
    return False

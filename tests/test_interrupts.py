"""interrupts.deferred_signals: Python signal handlers held back across a placement, then run by
CPython's own rules (real signals, sent to this process)."""
from __future__ import annotations

import os
import signal
import threading

import pytest

from shmpool import interrupts
from shmpool.interrupts import deferred_signals


class Boom(Exception):
    pass


@pytest.fixture
def handlers(monkeypatch):
    monkeypatch.setattr(interrupts, "RESCAN_SECONDS", 0.0)  # see handlers set a moment ago
    monkeypatch.setattr(interrupts, "_rescan_at", float("-inf"))  # a look an earlier test made
    ran: list[str] = []

    def raising(signum, frame):
        ran.append("USR1")
        raise Boom()

    def quiet(signum, frame):
        ran.append("USR2")

    old = signal.signal(signal.SIGUSR1, raising), signal.signal(signal.SIGUSR2, quiet)
    yield ran
    signal.signal(signal.SIGUSR1, old[0])
    signal.signal(signal.SIGUSR2, old[1])


def _spin() -> None:
    # Where CPython runs pending handlers: between bytecodes, and in a call that checks for
    # signals (after one handler raised, CPython runs the rest at the next such check).
    for _ in range(1000):
        pass
    signal.pthread_sigmask(signal.SIG_BLOCK, [])  # a call that checks


def test_handlers_wait_for_the_block_then_all_run(handlers) -> None:
    with pytest.raises(Boom):
        with deferred_signals():
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGUSR2)
            _spin()
            assert handlers == [], "a handler ran inside the block"
        _spin()
    _spin()
    # One handler raising must not cost the other its run: CPython keeps it pending.
    assert sorted(handlers) == ["USR1", "USR2"], handlers


def test_the_signal_mask_is_left_as_it_was(handlers) -> None:
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with deferred_signals():
        os.kill(os.getpid(), signal.SIGUSR2)
        _spin()
    _spin()
    assert handlers == ["USR2"]
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before


def test_other_threads_are_left_alone(handlers) -> None:
    seen: list[object] = []

    def other() -> None:
        with deferred_signals() as held:
            seen.append(held)

    t = threading.Thread(target=other)
    t.start()
    t.join(10)
    os.kill(os.getpid(), signal.SIGUSR2)
    _spin()
    assert handlers == ["USR2"]  # nothing was swapped by the other thread

"""Fixtures and hooks for the shmpool hardening tests (issue 5); helpers live in ``hardutil.py``."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from hardutil import (
    HERE, KIND_VALUES, RECOVERY_DEADLINE, SHUTDOWN_DEADLINE, TEST_BACKSTOP, all_shm_entries, call_with_deadline,
    pid_alive, shm_entries_of, wait_for,
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TEST_BACKSTOP))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: slower hardening tests (load / big payloads)")


# --- fixtures -----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def shmpool_mod():
    return pytest.importorskip("shmpool")


@pytest.fixture(params=KIND_VALUES)
def kind(request, shmpool_mod):
    """Every pool test runs under both start kinds (STYLE habit 9)."""
    return shmpool_mod.SubprocKind(request.param)


class PoolTracker:
    """Creates pools, remembers every worker/helper pid it ever saw, and checks cleanup at teardown."""

    def __init__(self, shmpool_mod):
        self.shmpool = shmpool_mod
        self.pools = []
        self.pids: set[int] = set()
        # Entries already present were reported by the test that leaked them; don't blame this one.
        self.before = all_shm_entries()

    def __call__(self, nprocs=2, **kwargs):
        pool = self.shmpool.SubprocPool(nprocs, **kwargs)
        self.pools.append(pool)
        self.note(pool)
        return pool

    def note(self, pool):
        """Record the pool's current processes so teardown can prove they are gone."""
        try:
            self.pids.update(pool.worker_pids())
            self.pids.update(pool.helper_pids())
        except Exception:
            pass  # a pool already shut down has no pids; teardown still checks what we saw

    def shutdown_all(self):
        for pool in self.pools:
            self.note(pool)
            call_with_deadline(pool.shutdown, SHUTDOWN_DEADLINE, "pool.shutdown()")

    def leftovers(self):
        procs = sorted(p for p in self.pids if pid_alive(p))
        shm = shm_entries_of(self.pids | {os.getpid()}) - self.before
        return procs, shm


@pytest.fixture
def make_pool(shmpool_mod):
    """Factory fixture: `make_pool(nprocs, kind=..., **kw)`.

    Teardown shuts every pool down within SHUTDOWN_DEADLINE, then checks that no worker or helper it
    saw is still alive and that nothing of ours (`shmp.<pid>.*`, `sem.shmp.<pid>.*` for this process
    or any of those pids) is left in /dev/shm.
    """
    tracker = PoolTracker(shmpool_mod)
    yield tracker
    tracker.shutdown_all()
    try:
        wait_for(lambda: tracker.leftovers() == ([], set()), RECOVERY_DEADLINE, "pool processes and /dev/shm entries to go")
    except AssertionError:
        procs, shm = tracker.leftovers()
        raise AssertionError(f"after shutdown(): live processes {procs}, /dev/shm leftovers {sorted(shm)}") from None

"""Permissions: another user cannot reach a pool's semaphores or rings.

We run as root, so each test forks a child that drops to uid/gid 65534 ("nobody") and attempts the
access; the child reports what happened through a pipe.

What is meaningful, given the design (shmpool/shm.py, shmpool/semaphores.py):

* Rings are memfds: they have no name at all, so the only way in from outside is /proc/<pid>/fd/<n> of a
  process holding one, which the kernel guards with a ptrace-mode check: another uid gets EACCES.
* Semaphores live inside the request memfd (process-shared sem_t): no name either, so nothing of ours
  appears in /dev/shm at any time, worker starts included, and the memfd check covers them.
"""
from __future__ import annotations

import os
import signal
import threading

import pytest

from hardutil import NOBODY, run_as_nobody, shm_entries_of, wait_for, warm

CHILD_DEADLINE = 60.0  # seconds a probe as another uid may take on a loaded machine


def _as_nobody(probe) -> dict:
    """Run probe() -> dict in a forked child dropped to uid/gid 65534; return that dict."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to another uid")
    out = run_as_nobody(probe, CHILD_DEADLINE)
    assert "child_error" not in out, out
    assert out["uid"] == NOBODY
    return out


def test_starting_workers_put_nothing_in_dev_shm(make_pool, kind):
    """/dev/shm, watched while a pool of 4 starts, runs jobs and replaces a killed worker: no entry
    of ours appears, not even for a moment (named semaphores did, from the parent's create until
    each starting worker unlinked them: a SIGKILL then left them behind)."""
    ours = f"sem.shmp.{os.getpid()}."  # what the parent named them (other tests may run beside us)
    seen: set[str] = set()
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen.update(e for e in os.listdir("/dev/shm") if e.startswith(ours))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        pool = make_pool(4, kind=kind, ring_size=1 << 20)
        make_pool.note(pool)
        assert len(warm(pool, 4)) == 4
        os.kill(pool.worker_pids()[0], signal.SIGKILL)
        wait_for(lambda: len(pool.worker_pids()) == 4 and len(warm(pool, 4)) == 4, 30.0, "a replacement worker")
    finally:
        stop.set()
        watcher.join(10)
    assert seen == set(), f"shmpool entries appeared in /dev/shm: {sorted(seen)}"


def _memfds_of(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/memfd:shmpool"):
            out.append(f"/proc/{pid}/fd/{fd}")
    return out


def test_live_pool_semaphores_and_rings_are_closed_to_other_users(make_pool, kind):
    """On a live pool that has run jobs: no name of ours is in /dev/shm; uid 65534 cannot list a worker's
    or the parent's fds, and cannot open any ring memfd (which holds the semaphores too) through
    /proc/<pid>/fd/<n> (root can: the paths are real)."""
    pool = make_pool(2, kind=kind, ring_size=1 << 20)
    assert len(warm(pool, 2)) == 2  # both workers past their start
    make_pool.note(pool)
    pids = pool.worker_pids() + pool.helper_pids()
    assert shm_entries_of(set(pids) | {os.getpid()}) == set(), "shmpool entries in /dev/shm"

    memfds = [p for pid in pool.worker_pids() + [os.getpid()] for p in _memfds_of(pid)]
    assert len(memfds) >= 2 * 2 * 2, memfds  # 2 rings per worker, held by the worker and by the parent
    for path in memfds:  # positive control as root
        with open(path, "rb") as f:
            # the request segment also holds a small control block after its ring
            assert 1 << 20 <= os.fstat(f.fileno()).st_size <= (1 << 20) + 4096

    def probe():
        res = {"fd": {}, "fddir": {}}
        for path in memfds:
            try:
                open(path, "rb").close()
                res["fd"][path] = "OPENED"
            except PermissionError:
                res["fd"][path] = "PermissionError"
            except OSError as e:
                res["fd"][path] = f"{type(e).__name__}"
        for pid in set(int(p.split("/")[2]) for p in memfds):
            try:
                os.listdir(f"/proc/{pid}/fd")
                res["fddir"][pid] = "LISTED"
            except PermissionError:
                res["fddir"][pid] = "PermissionError"
        return res

    got = _as_nobody(probe)
    assert got["fd"] and all(v == "PermissionError" for v in got["fd"].values()), got["fd"]
    assert all(v == "PermissionError" for v in got["fddir"].values()), got["fddir"]

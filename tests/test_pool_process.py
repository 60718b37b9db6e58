"""`pool.process`: the handle torch's code and tests hold on a pool's processes.

torch's SubprocPool keeps its sidecar's `subprocess.Popen` there; its shutdown() calls
`self.process.wait(timeout)`, and torch's test_shutdown_terminates_sidecar_worker_pool replaces
`pool.process.wait` with a 2 s version, shuts down while a job sleeps, and on
`subprocess.TimeoutExpired` calls `pool.process.kill()` then `pool.process.wait()`. shmpool has
no sidecar: the handle stands for all of the pool's processes (workers, fork helper).
"""
from __future__ import annotations

import operator
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shmpool import SubprocKind, SubprocPool


REPO = Path(__file__).resolve().parents[1]
# A fresh interpreter importing shmpool and starting two workers: a few seconds on 2 cores.
CHILD_DEADLINE_S = 60.0
# What torch's test lets shutdown() take while a worker sleeps in a job.
SHUTDOWN_WAIT_S = 2.0
JOB_DEADLINE_S = 60.0


def test_process_handle_waits_for_the_pools_processes(kind: SubprocKind) -> None:
    pool = SubprocPool(2, kind=kind)
    try:
        assert pool.submit(operator.add, 1, 2).result(timeout=JOB_DEADLINE_S) == 3
        handle = pool.process
        assert pool.process is handle  # one handle for the pool's life, as torch's Popen
        assert handle.poll() is None
        assert handle.returncode is None
        with pytest.raises(subprocess.TimeoutExpired):
            handle.wait(timeout=0.1)
        if kind is SubprocKind.FORK:
            assert handle.pid == pool.helper_pids()[0]
    finally:
        pool.shutdown()
    assert handle.wait(timeout=SHUTDOWN_WAIT_S) == handle.returncode
    assert handle.poll() is not None
    assert handle.wait() == handle.returncode  # again: at once, same code


def test_process_kill_stops_every_process(kind: SubprocKind) -> None:
    pool = SubprocPool(2, kind=kind)
    try:
        pool.submit(os.getpid).result(timeout=JOB_DEADLINE_S)
        pids = pool.worker_pids() + pool.helper_pids()
        pool.process.kill()
        pool.process.wait(timeout=SHUTDOWN_WAIT_S)
        for pid in pids:
            assert not os.path.exists(f"/proc/{pid}") or _is_zombie(pid), pid
    finally:
        pool.shutdown()


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


# torch's test_shutdown_terminates_sidecar_worker_pool, against shmpool's pool: shutdown() with a
# job still sleeping must be done within the 2 s its patched process.wait allows.
SHUTDOWN_CHILD = textwrap.dedent(
    """
    import operator, subprocess, sys, time
    from shmpool import SubprocKind, SubprocPool

    pool = SubprocPool(2, kind=SubprocKind(sys.argv[1]))
    assert pool.submit(operator.add, 1, 2).result() == 3
    pool.submit(time.sleep, 5)
    time.sleep(0.5)

    wait = pool.process.wait

    def short_wait(timeout=None):
        return wait(timeout=2)

    pool.process.wait = short_wait
    try:
        pool.shutdown()
    except subprocess.TimeoutExpired:
        pool.process.kill()
        pool.process.wait()
        raise
    assert pool.process.poll() is not None, "shutdown returned with processes still running"
    print("shutdown returned")
    """
)


def test_shutdown_with_a_job_running_returns_like_torchs(kind: SubprocKind, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(
        [sys.executable, "-c", SHUTDOWN_CHILD, kind.value],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=CHILD_DEADLINE_S,
    )
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert "shutdown returned" in r.stdout

"""Regression tests for issue 9: one test (or one parametrized table) per defect class.

Each test names the defect number it covers.  Every wait has a deadline (hardutil.result_within /
assert_all_resolve), so a hang fails as "future ... did not resolve within N s", never as the
pytest-timeout backstop.  Pool tests run under both start kinds (the `kind` fixture).

Expectations chosen here (the fix should match them):
* a job whose result the parent cannot map (defect 3) fails with shmpool.SharedMemoryError (or an
  OSError subclass) carrying a non-empty message; the pool goes on;
* a protocol error from a worker (defect 4) fails the job it held with a BrokenProcessPool subclass
  (WorkerDiedError) whose message contains "protocol"; other jobs are not failed;
* a forked child's submit (defect 8) raises RuntimeError mentioning "fork", or runs on a pool of its own;
* a worker that cannot map a job's argument (defect 9) fails that job with exactly SharedMemoryError and
  lives on;
* when some workers cannot start (defect 11) queued jobs run on the live ones; when none can,
  WorkerStartError names the cause ("Too many open files"), not the initializer.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import jobs
from hardutil import (
    HERE, JOB_DEADLINE, RECOVERY_DEADLINE, assert_all_resolve, error_text, exception_within, pid_alive,
    result_within, wait_for, warm,
)

pytestmark = pytest.mark.timeout(120)

KiB = 1 << 10
MiB = 1 << 20
RING = 1 << 20  # the smallest ring the pool allows: makes "bigger than half the ring" cheap
# A wait that must not block: a correct pool answers a tiny job in milliseconds; a hang shows here.
HANG_DEADLINE = 10.0


def _sha1(data) -> str:
    return hashlib.sha1(memoryview(data).cast("B")).hexdigest()


def _array(nbytes: int, seed: int) -> np.ndarray:
    return np.frombuffer(jobs.pattern(nbytes, seed), dtype=np.uint8).copy()


# --- defect 1: a queued job waits forever for ring space that was already freed ----------------------
@pytest.mark.parametrize("pattern", ["two_at_a_time", "one_at_a_time_slow_free"])
@pytest.mark.parametrize("job", ["digest", "identity"])
def test_d1_big_args_never_wait_for_freed_space(make_pool, kind, job, pattern):
    """Defect 1. One worker, a 1 MiB ring, ~600 KB numpy arguments (more than half the ring): every job
    must finish promptly.  The worker frees a slot it used in place only after its reply; a job that
    found the ring full then (the next one queued behind, or submitted the moment the result came) is
    never retried: hang.  "two_at_a_time" submits two per round (the second waits for the first's slot);
    "one_at_a_time_slow_free" does result() per job while a GIL-spinning thread in the worker makes it
    slow to free the slot after replying, as a loaded machine does."""
    pool = make_pool(1, kind=kind, ring_size=RING)
    result_within(pool.submit(jobs.getpid), JOB_DEADLINE, "the first job")
    rounds, per_round = (50, 2) if pattern == "two_at_a_time" else (30, 1)
    if pattern == "one_at_a_time_slow_free":
        result_within(pool.submit(jobs.start_gil_spinner, 0.005), JOB_DEADLINE, "start_gil_spinner")
    fn = jobs.bytes_digest if job == "digest" else jobs.identity
    for i in range(rounds):
        arrs = [_array(600 * KiB, 2 * i + j) for j in range(per_round)]
        futs = [pool.submit(fn, a) for a in arrs]
        for j, (a, f) in enumerate(zip(arrs, futs)):
            got = result_within(f, HANG_DEADLINE, f"round {i} job {j} ({job}, 600 KB on a 1 MiB ring)")
            if job == "digest":
                assert got == _sha1(a), f"round {i} job {j}"
            else:
                assert isinstance(got, np.ndarray) and np.array_equal(got, a), f"round {i} job {j}"

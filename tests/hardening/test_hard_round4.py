"""Regression tests for round 4 of the hardening review: short jobs stacked behind a long one.

R4-1: the pool stacks short jobs in a worker's ring behind each other (one wake-up for many) once it
has learnt that jobs are short. A job that then runs long must not keep the short jobs stacked behind
it waiting while another worker could run them: after dispatcher.STALL_SECONDS the stacked jobs that
worker was never told of go back to the queue, and nothing more is stacked on it until it answers.
"""
from __future__ import annotations

import concurrent.futures as cf
import time

import pytest

import jobs
from hardutil import JOB_DEADLINE, assert_all_resolve, result_within

pytestmark = pytest.mark.timeout(120)

LONG_SECONDS = 4.0
SHORT_DEADLINE = 2.0  # far under LONG_SECONDS: a short job left behind the long one misses it


def _teach_short_jobs(pool, rounds: int = 3, n: int = 500) -> None:
    for r in range(rounds):
        outcomes = assert_all_resolve([pool.submit(jobs.add, i, 1) for i in range(n)], JOB_DEADLINE, "warm-up job")
        assert outcomes == [("ok", i + 1) for i in range(n)], f"warm-up round {r}"


@pytest.mark.parametrize("when", ["while-it-runs", "right-behind-it"])
def test_r4_1_short_jobs_are_not_left_behind_a_long_one(make_pool, kind, when):
    """Two workers, taught that jobs are short. A long job starts on one; 200 tiny jobs follow,
    either once it runs or in the same burst: each caller stacks some on the long job's worker, by
    the fewest-jobs rule, and the old pool left 48-63 of them there for the whole long job (sent to
    it 16 at a time). Every tiny job must finish well before the long job does."""
    pool = make_pool(2, kind=kind)
    _teach_short_jobs(pool)
    long_job = pool.submit(jobs.sleep_return, LONG_SECONDS, "long")
    if when == "while-it-runs":
        time.sleep(0.3)
    started = time.monotonic()
    shorts = [pool.submit(jobs.add, i, 1) for i in range(200)]
    done, not_done = cf.wait(shorts, timeout=SHORT_DEADLINE)
    assert not not_done, f"{len(not_done)} of 200 short jobs still waiting behind the long job after {SHORT_DEADLINE} s"
    assert time.monotonic() - started < LONG_SECONDS
    assert [f.result(timeout=LONG_SECONDS + JOB_DEADLINE) for f in shorts] == [i + 1 for i in range(200)]
    assert result_within(long_job, JOB_DEADLINE, "the long job") == "long"
    # The worker that ran it takes jobs again.
    assert assert_all_resolve([pool.submit(jobs.add, i, 2) for i in range(100)], JOB_DEADLINE, "after") == [
        ("ok", i + 2) for i in range(100)
    ]

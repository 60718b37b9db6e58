"""Regression tests for round 4 of the hardening review: short jobs stacked behind a long one.

R4-1: the pool stacks short jobs in a worker's ring behind each other (one wake-up for many) once it
has learnt that jobs are short. A job that then runs long must not keep the short jobs stacked behind
it waiting while another worker could run them: after dispatcher.STALL_SECONDS the stacked jobs that
worker was never told of go back to the queue, and nothing more is stacked on it until it answers.
The jobs it was told of but has not taken are withdrawn (claims.py) and go back to the queue too.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import os
import signal
import time

import pytest

import jobs
from hardutil import JOB_DEADLINE, assert_all_resolve, result_within

from shmpool.errors import WorkerDiedError

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


def _burst_around_a_long_job(pool, path, n: int = 500):
    shorts = [pool.submit(jobs.note_and_add, path, i, 1) for i in range(n)]
    long_job = pool.submit(jobs.sleep_return_pid, LONG_SECONDS)
    shorts += [pool.submit(jobs.note_and_add, path, i, 1) for i in range(n, 2 * n)]
    return shorts, long_job


def _assert_each_ran_once(path, n: int) -> None:
    with open(path) as f:
        runs = collections.Counter(int(line) for line in f)
    twice = sorted(i for i, c in runs.items() if c > 1)
    never = sorted(set(range(n)) - set(runs))
    assert not twice and not never, f"ran more than once: {twice[:10]}; never ran: {never[:10]}"


def test_r4_1_short_jobs_sent_with_a_long_one_in_one_burst_are_withdrawn(make_pool, kind, tmp_path):
    """500 short jobs, a long one, 500 more, at once: the long job's worker was sent up to
    SENT_AHEAD short jobs behind it before it turned out long (61 of 1,000 waited the whole long
    job before: only jobs it had never been told of were taken back). Now the ones it has not
    taken are withdrawn and run by the other worker: every short job finishes well before the
    long one, each runs exactly once, and the long job's worker frees their regions and goes on."""
    pool = make_pool(2, kind=kind)
    _teach_short_jobs(pool)
    path = str(tmp_path / "runs")
    started = time.monotonic()
    shorts, long_job = _burst_around_a_long_job(pool, path)
    done, not_done = cf.wait(shorts, timeout=SHORT_DEADLINE)
    assert not not_done, f"{len(not_done)} of 1000 short jobs still waiting behind the long job after {SHORT_DEADLINE} s"
    assert time.monotonic() - started < LONG_SECONDS
    assert [f.result(timeout=JOB_DEADLINE) for f in shorts] == [i + 1 for i in range(1000)]
    long_pid = result_within(long_job, LONG_SECONDS + JOB_DEADLINE, "the long job")
    _assert_each_ran_once(path, 1000)
    assert pool.stats().jobs_withdrawn > 0
    # The long job's worker is the same process and takes jobs again: its withdrawn regions were freed.
    assert long_pid in pool.worker_pids()
    again = assert_all_resolve([pool.submit(jobs.add, i, 2) for i in range(2000)], JOB_DEADLINE, "after")
    assert again == [("ok", i + 2) for i in range(2000)]


def test_r4_1_jobs_withdrawn_from_a_worker_that_then_dies_run_once(make_pool, kind, tmp_path):
    """The same burst, then the long job's worker is SIGKILLed once its jobs were withdrawn and
    run elsewhere: the long job fails with WorkerDiedError, no short job runs a second time (the
    dead worker's untaken jobs were the parent's already), and the pool goes on."""
    pool = make_pool(2, kind=kind)
    _teach_short_jobs(pool)
    path, pidfile = str(tmp_path / "runs"), str(tmp_path / "long.pid")
    shorts = [pool.submit(jobs.note_and_add, path, i, 1) for i in range(500)]
    long_job = pool.submit(jobs.note_pid_and_sleep, pidfile, LONG_SECONDS, "long")
    shorts += [pool.submit(jobs.note_and_add, path, i, 1) for i in range(500, 1000)]
    done, not_done = cf.wait(shorts, timeout=SHORT_DEADLINE)
    assert not not_done, f"{len(not_done)} of 1000 short jobs still waiting behind the long job"
    with open(pidfile) as f:
        os.kill(int(f.read()), signal.SIGKILL)
    with pytest.raises(WorkerDiedError):
        long_job.result(timeout=JOB_DEADLINE)
    again = assert_all_resolve([pool.submit(jobs.add, i, 2) for i in range(200)], JOB_DEADLINE, "after")
    assert again == [("ok", i + 2) for i in range(200)]
    _assert_each_ran_once(path, 1000)

"""Regression tests for defects an adversarial review found: each test states the behaviour the
pool must have. Real workers of both kinds, real shared memory, a deadline on every wait.

Job functions and picklers the workers need are defined at module level here (or taken from
``corejobs``): the pool passes its sys.path on, so a SPAWN worker imports this module too."""
from __future__ import annotations

import concurrent.futures as cf
import gc
import logging
import math
import os
import pickle
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import corejobs
from shmpool import (
    SubprocException,
    SubprocKind,
    SubprocPickler,
    SubprocPool,
    WorkerDiedError,
)
from shmpool import codec, dispatcher

DEADLINE = 20.0  # seconds any one future may take here (short: the old code must fail fast, not hang)
IN_WORKER = "SHMPOOL_REVIEW_IN_WORKER"  # set in the workers' environment by the tests that need it


# ------------------------------------------------------------------------------ job functions


def fork_in_job(how: str) -> tuple[str, int]:
    """Fork a child that ends the way ``how`` says, instead of with os._exit: it returns from the
    job ("returns") or raises SystemExit ("sys_exit"). The worker (the parent) waits for it, a
    bounded while, and answers "parent"; the child's own answer would be "child"."""
    me = os.getpid()
    child = os.fork()
    if child == 0:
        if how == "sys_exit":
            sys.exit(0)
        return ("child", os.getpid())
    deadline = time.monotonic() + 5.0
    while True:
        done, _ = os.waitpid(child, os.WNOHANG)
        if done:
            return ("parent", me)
        if time.monotonic() > deadline:  # the child went on as a worker: stop it
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
            return ("parent, child had to be killed", me)
        time.sleep(0.01)


def ignore_term_mark_sleep(folder: str, seconds: float) -> None:
    """Ignore SIGTERM, say so with a file named after this pid, then sleep."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Path(folder, str(os.getpid())).touch()
    time.sleep(seconds)


def start_when_file_exists(path: str, started: str) -> None:
    """An initializer that notes the worker's pid in ``started`` (a folder), then waits (60 s at
    most) until ``path`` exists."""
    Path(started, str(os.getpid())).touch()
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)


def count_and_sum(arrays: list[np.ndarray]) -> tuple[int, int]:
    return len(arrays), int(sum(int(a.sum()) for a in arrays))


def make_arrays(n: int) -> list[np.ndarray]:
    return [np.full(2, i, np.int32) for i in range(n)]


STR_PLEASE = "a str from dumps, please"


class StrDumpsInWorker(SubprocPickler):
    """A dumps/loads pickler whose ``dumps`` returns a str, not bytes, in a worker, for the one
    result STR_PLEASE; everything else pickles as usual."""

    def dumps(self, obj: object) -> bytes:
        data = pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
        if os.environ.get(IN_WORKER) == "1" and isinstance(obj, str) and obj == STR_PLEASE:
            return data.decode("latin-1")  # type: ignore[return-value]
        return data

    def loads(self, data: bytes) -> object:
        if isinstance(data, str):
            data = data.encode("latin-1")
        return pickle.loads(data)


# ------------------------------------------------------------------------------ helpers


def warm(pool: SubprocPool, n: int) -> set[int]:
    """Return once ``n`` distinct workers have run a job; their pids."""
    seen: set[int] = set()
    deadline = time.monotonic() + DEADLINE
    while len(seen) < n:
        assert time.monotonic() < deadline, f"only {len(seen)} of {n} workers came up"
        seen |= {f.result(DEADLINE) for f in [pool.submit(corejobs.pid_after, 0.1) for _ in range(n)]}
    return seen


def still_works(pool: SubprocPool) -> None:
    fs = [pool.submit(corejobs.add, i, 1) for i in range(4)]
    assert [f.result(DEADLINE) for f in fs] == [1, 2, 3, 4]


def message_of(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------------------ 1: timeouts


@pytest.mark.parametrize("timeout", [math.inf, 30 * 86400.0], ids=["inf", "30days"])
def test_a_long_job_timeout_keeps_the_pool(make_pool, timeout: float) -> None:
    """timeout=math.inf (never) or 30 days is a legitimate per-job timeout: the job and a
    concurrent one return their values, and the pool takes later jobs."""
    pool = make_pool(2)
    assert pool.submit(corejobs.add, 1, 1).result(DEADLINE) == 2
    bystander = pool.submit(corejobs.sleep_then, 0.3, "bystander")
    timed = pool.submit_job(corejobs.sleep_then, (0.3, "timed"), timeout=timeout)
    assert timed.result(DEADLINE) == "timed"
    assert bystander.result(DEADLINE) == "bystander"
    time.sleep(0.2)  # a dispatcher pass or two with the long deadline in its books
    still_works(pool)
    assert pool.submit_job(corejobs.add, (2, 2), timeout=timeout).result(DEADLINE) == 4


def test_quiesce_after_inf_keeps_the_pool(make_pool) -> None:
    """quiesce=True, quiesce_after=math.inf ("never on its own"): the pool keeps working after
    its first job."""
    pool = make_pool(2, quiesce=True, quiesce_after=math.inf)
    for i in range(3):
        assert pool.submit(corejobs.add, i, 1).result(DEADLINE) == i + 1
        time.sleep(0.2)
    still_works(pool)


@pytest.mark.parametrize("timeout", [float("nan"), "1"], ids=["nan", "str"])
def test_an_invalid_job_timeout_is_refused_before_anything_is_sent(make_pool, timeout: Any) -> None:
    """timeout=NaN or a str: submit_job raises ValueError/TypeError at once, before the job is
    counted, placed or sent, and the pool stays usable."""
    pool = make_pool(1)
    assert pool.submit(corejobs.add, 1, 1).result(DEADLINE) == 2
    before = pool.stats()
    with pytest.raises((ValueError, TypeError)):
        pool.submit_job(corejobs.sleep_then, (0.5, "slept"), timeout=timeout)
    after = pool.stats()
    assert after.jobs_submitted == before.jobs_submitted, "the refused job was counted (so it got into the pool)"
    still_works(pool)
    assert pool.submit_job(corejobs.add, (2, 2), timeout=DEADLINE).result(DEADLINE) == 4
    assert pool.stats().workers_started == before.workers_started


# ------------------------------------------------------------------------------ 3: finalizers


class _SubmitsWhenCollected:
    """A reference cycle whose finalizer submits to the pool (recording the future, or the
    RuntimeError the pool may answer with)."""

    def __init__(self, pool: SubprocPool, record: list[Any]) -> None:
        self.me = self
        self.pool = pool
        self.record = record

    def __del__(self) -> None:
        try:
            self.record.append(self.pool.submit(corejobs.add, 40, 2))
        except RuntimeError as e:
            self.record.append(e)


def test_a_finalizer_that_submits_during_a_collection_inside_a_pool_call_does_not_deadlock(make_pool) -> None:
    """The cyclic collector runs finalizers at any allocation, in whichever thread makes it,
    including one inside the pool's own code (with its lock held). A finalizer that submits
    then must not deadlock the pool: its submit succeeds or raises RuntimeError, every future
    resolves, and the pool works afterwards.

    Made (near) deterministic: before each submit of a burst, the young generation is emptied
    (gc.collect(0)), one garbage cycle is made with collection off, and collection is switched
    on with a threshold that rises by one per submit, so the collection lands on each of the
    submit path's allocations in turn, those made under the pool's lock included."""
    pool = make_pool(2)
    warm(pool, 2)
    from_finalizers: list[Any] = []
    futures: list[cf.Future] = []
    errors: list[BaseException] = []
    old_threshold, was_enabled = gc.get_threshold(), gc.isenabled()

    def burst() -> None:
        try:
            for i in range(300):
                gc.disable()
                gc.collect(0)
                _SubmitsWhenCollected(pool, from_finalizers)
                gc.set_threshold(1 + i % 150)
                gc.enable()
                futures.append(pool.submit(corejobs.add, i, 1))
            gc.disable()
        except BaseException as e:  # reported below
            errors.append(e)
        finally:
            gc.set_threshold(*old_threshold)

    thread = threading.Thread(target=burst, name="finalizer-burst", daemon=True)
    try:
        t = time.monotonic()
        thread.start()
        thread.join(10.0)
        took = time.monotonic() - t
        finished = not thread.is_alive()
    finally:
        gc.set_threshold(*old_threshold)
        if was_enabled:
            gc.enable()
        else:
            gc.disable()
        if thread.is_alive():
            # Deadlocked on the pool's lock, taken again by a finalizer in the thread that holds
            # it: let go of it from here, so the pool can still be shut down.
            for _ in range(100):
                try:
                    pool._core.lock.release()
                except RuntimeError:
                    pass
                thread.join(0.1)
                if not thread.is_alive():
                    break
    assert finished, (
        f"a burst of submits with finalizers submitting from the collector deadlocked after {len(futures)} "
        f"submits, {len(from_finalizers)} from finalizers"
    )
    assert took < 10.0
    assert not errors, f"the burst raised: {[message_of(e) for e in errors]}"
    done, not_done = cf.wait(futures, timeout=DEADLINE)
    assert not not_done, f"{len(not_done)} of {len(futures)} jobs never resolved"
    assert [f.result(0) for f in futures] == [i + 1 for i in range(len(futures))]
    gc.collect()  # any cycle still around: its finalizer runs now, outside the pool
    finalizer_futures = [x for x in from_finalizers if not isinstance(x, BaseException)]
    done, not_done = cf.wait(finalizer_futures, timeout=DEADLINE)
    assert not not_done, f"{len(not_done)} of {len(finalizer_futures)} jobs submitted by finalizers never resolved"
    assert all(f.result(0) == 42 for f in finalizer_futures)
    still_works(pool)


# ------------------------------------------------------------------------------ 4: callbacks


@pytest.mark.parametrize("how", ["wait", "as_completed"])
def test_a_callback_waiting_on_the_same_pool_does_not_stall_it(make_pool, how: str) -> None:
    """A done-callback runs on the pool's dispatcher thread; waiting there with
    concurrent.futures.wait()/as_completed() for another job of the same pool must not hold up
    that job's result (either the wait raises RuntimeError at once, as .result() does from a
    callback, or it returns because the result arrived). The other job resolves within ~2 s,
    well under the 5 s the callback would wait."""
    pool = make_pool(2)
    warm(pool, 2)
    seen: dict[str, Any] = {}
    second = pool.submit(corejobs.sleep_then, 0.3, "second")

    def callback(_: cf.Future) -> None:
        seen["second done at start"] = second.done()
        t = time.monotonic()
        try:
            if how == "wait":
                done, _ = cf.wait([second], timeout=5)
                seen["outcome"] = f"returned, second done={second in done}"
            else:
                try:
                    for _ in cf.as_completed([second], timeout=5):
                        pass
                    seen["outcome"] = "returned, second done=True"
                except cf.TimeoutError:
                    seen["outcome"] = "timed out"
        except RuntimeError as e:
            seen["outcome"] = f"RuntimeError: {e}"
        seen["seconds"] = time.monotonic() - t

    first = pool.submit(corejobs.add, 2, 2)
    first.add_done_callback(callback)
    t0 = time.monotonic()
    assert second.result(timeout=2.5) == "second", "the other job's result waited for the callback"
    assert first.result(DEADLINE) == 4
    deadline = time.monotonic() + 6
    while "seconds" not in seen and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "seconds" in seen, f"the callback did not finish: {seen}"
    assert seen["second done at start"] is False, f"nothing tested: the other job was done already {seen}"
    assert seen["outcome"] in ("returned, second done=True",) or seen["outcome"].startswith("RuntimeError"), seen
    assert seen["seconds"] < 2.5, seen
    assert time.monotonic() - t0 < 5
    still_works(pool)


# ------------------------------------------------------------------------------ 5: jobs that fork


@pytest.mark.parametrize("how", ["returns", "sys_exit"])
def test_a_job_that_forks_is_answered_by_the_worker_not_its_child(make_pool, how: str) -> None:
    """A job forks a child that returns from the job function (or raises SystemExit) instead of
    calling os._exit: the caller gets the worker's (the parent's) answer, never the child's, and
    the next jobs are run by the pool's own workers."""
    pool = make_pool(1)
    worker = next(iter(warm(pool, 1)))
    future = pool.submit(fork_in_job, how)
    exc = future.exception(DEADLINE)
    assert exc is None, f"the job failed (with its forked child's way out?): {message_of(exc)}"
    answer = future.result(0)
    assert answer == ("parent", worker), f"the job's answer came from its forked child: {answer}"
    pids = [f.result(DEADLINE) for f in [pool.submit(corejobs.pid) for _ in range(4)]]
    live = pool.worker_pids()
    assert set(pids) <= set(live), f"jobs answered by {sorted(set(pids))}, the pool's workers are {live}"


# ------------------------------------------------------------------------------ 6: fork of the caller


@pytest.mark.parametrize("what", ["stats", "worker_pids"])
def test_a_forked_child_of_the_caller_does_not_hang_in_stats_or_worker_pids(make_pool, what: str) -> None:
    """A child forked while another thread holds the pool's lock calls pool.stats() /
    pool.worker_pids(): it gets an answer or a clear error (RuntimeError) at once, never a hang
    on the lock copied in its held state."""
    pool = make_pool(1)
    assert pool.submit(corejobs.add, 1, 1).result(DEADLINE) == 2
    lock = pool._core.lock
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold, name="lock-holder", daemon=True)
    holder.start()
    assert held.wait(5)
    r, w = os.pipe()
    try:
        child = os.fork()
        if child == 0:  # the child: never leaves this block
            try:
                os.close(r)
                try:
                    getattr(pool, what)()
                    msg = "returned"
                except RuntimeError as e:
                    msg = f"RuntimeError: {e}"
                except BaseException as e:
                    msg = f"unexpected {type(e).__name__}: {e}"
                os.write(w, msg.encode(errors="replace")[:1000])
            finally:
                os._exit(0)
    finally:
        release.set()
    os.close(w)
    try:
        deadline = time.monotonic() + 5.0
        status = None
        while status is None:
            done, st = os.waitpid(child, os.WNOHANG)
            if done:
                status = st
            elif time.monotonic() > deadline:
                os.kill(child, signal.SIGKILL)
                os.waitpid(child, 0)
                pytest.fail(f"pool.{what}() hung in a forked child (the pool's lock was held at the fork)")
            else:
                time.sleep(0.02)
        msg = os.read(r, 4096).decode(errors="replace")
    finally:
        os.close(r)
    holder.join(5)
    assert os.waitstatus_to_exitcode(status) == 0
    assert msg == "returned" or msg.startswith("RuntimeError"), msg
    still_works(pool)


# ------------------------------------------------------------------------------ 7: cancel


def test_cancelling_a_queued_job_logs_nothing(make_pool, caplog: pytest.LogCaptureFixture) -> None:
    """cancel() of a job still queued is the documented way to drop it: the future is cancelled,
    the others resolve, and nothing is logged at ERROR or CRITICAL when the job's turn comes."""
    caplog.set_level(logging.WARNING)
    pool = make_pool(1)
    assert pool.submit(corejobs.add, 1, 1).result(DEADLINE) == 2
    busy = pool.submit(corejobs.sleep_then, 0.5, "busy")
    queued = pool.submit(corejobs.add, 2, 2)
    after = pool.submit(corejobs.add, 3, 3)
    assert queued.cancel()
    assert busy.result(DEADLINE) == "busy"
    assert after.result(DEADLINE) == 6
    assert queued.cancelled()
    with pytest.raises(cf.CancelledError):
        queued.result(0)
    still_works(pool)
    time.sleep(0.2)  # the dispatcher's pass over the cancelled job, if any, is behind us
    bad = [f"{r.name} {r.levelname}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]
    assert bad == []


# ------------------------------------------------------------------------------ 8: many buffers


def test_more_buffers_than_the_table_holds_go_in_band(make_pool) -> None:
    """An argument (and a result) of 70,000 numpy arrays, each an out-of-band buffer: more than
    the region table holds (codec.MAX_BUFFERS). The ones past it go in band: the job gets every
    array and returns them all (the old code failed it in the worker with a CodecError about a
    region table that "does not fit"); the pool still works."""
    n = 70_000
    assert n > codec.MAX_BUFFERS
    pool = make_pool(1)
    assert pool.submit(corejobs.add, 1, 1).result(DEADLINE) == 2
    arrays = make_arrays(n)
    assert pool.submit(count_and_sum, arrays).result(DEADLINE) == (n, 2 * sum(range(n)))
    still_works(pool)
    back = pool.submit(make_arrays, n).result(DEADLINE)
    assert len(back) == n and all(int(a[0]) == i for i, a in enumerate(back))
    still_works(pool)


# ------------------------------------------------------------------------------ 11: shutdown


@pytest.mark.parametrize("kind", [SubprocKind.SPAWN], ids=["spawn"])  # FORK workers are stopped together already
def test_shutdown_stops_workers_that_ignore_sigterm_in_parallel(make_pool, kind: SubprocKind, tmp_path: Path) -> None:
    """Four SPAWN workers busy in jobs that ignore SIGTERM: shutdown() gives them their grace
    together, not one after another (QUIT_GRACE + KILL_WAIT in all; the old code took 1 s more
    per worker)."""
    n = 4
    pool = make_pool(n, ring_size=1 << 20)
    futures = [pool.submit(ignore_term_mark_sleep, str(tmp_path), 60) for _ in range(n)]
    deadline = time.monotonic() + 40
    while len(list(tmp_path.iterdir())) < n:
        assert time.monotonic() < deadline, f"only {len(list(tmp_path.iterdir()))} of {n} jobs started"
        time.sleep(0.1)
    pids = [int(p.name) for p in tmp_path.iterdir()]
    bound = dispatcher.QUIT_GRACE + dispatcher.KILL_WAIT + 1.0
    t = time.monotonic()
    pool.shutdown()
    took = time.monotonic() - t
    assert took < bound, (
        f"shutdown took {took:.1f} s for {n} workers ignoring SIGTERM (bound {bound:.1f} s: they are "
        f"stopped together, not one after another)"
    )
    for f in futures:
        assert f.done() and isinstance(f.exception(0), RuntimeError)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# ------------------------------------------------------------------------------ 12: picklers


def test_a_pickler_whose_dumps_returns_str_fails_the_job_not_the_worker(make_pool) -> None:
    """A custom pickler's dumps returns a str for a job's result in the worker: that job fails
    with a clear error about the pickler, the worker lives on and runs the next job."""
    pool = make_pool(1, pickler=StrDumpsInWorker(), env={IN_WORKER: "1"})
    worker = pool.submit(corejobs.pid).result(DEADLINE)
    exc = pool.submit(corejobs.echo, STR_PLEASE).exception(DEADLINE)
    assert exc is not None, "a str from dumps went through as a result"
    assert not isinstance(exc, WorkerDiedError), f"the worker died: {message_of(exc)}"
    assert isinstance(exc, (SubprocException, TypeError, ValueError)), message_of(exc)
    msg = str(exc).lower()
    assert "pickler" in msg or "dumps" in msg or "strdumpsinworker" in msg, message_of(exc)
    assert pool.submit(corejobs.pid).result(DEADLINE) == worker, "the next job ran on another worker"
    assert pool.submit(corejobs.echo, "plain").result(DEADLINE) == "plain"
    assert pool.stats().workers_died == 0


# ------------------------------------------------------------------------------ 12: starting workers


def test_a_worker_stopped_while_starting_is_replaced(make_pool, tmp_path: Path) -> None:
    """The only worker is SIGSTOPped in its start-up (inside its initializer, so the moment is
    certain): it never becomes ready. After worker_start_timeout it is killed and counted as a
    failed start, a replacement starts, and the queued job, with a timeout of its own, runs there
    (the old code waited for the stopped worker forever: a job's timeout counts from its start)."""
    go, started = tmp_path / "go", tmp_path / "started"
    started.mkdir()
    pool = make_pool(1, initializer=start_when_file_exists, initargs=(str(go), str(started)),
                     worker_start_timeout=2.0)
    deadline = time.monotonic() + DEADLINE
    while not any(started.iterdir()):
        assert time.monotonic() < deadline, "the worker never reached its initializer"
        time.sleep(0.01)
    stopped = int(next(started.iterdir()).name)
    os.kill(stopped, signal.SIGSTOP)
    try:
        future = pool.submit_job(corejobs.add, (1, 2), timeout=1.0)
        go.touch()  # a replacement gets through its initializer at once
        assert future.result(DEADLINE) == 3
        assert stopped not in pool.worker_pids()
    finally:
        try:
            os.kill(stopped, signal.SIGCONT)
        except ProcessLookupError:
            pass  # killed, as it should be
    still_works(pool)


def test_workers_that_never_become_ready_fail_the_queue_clearly(make_pool, tmp_path: Path) -> None:
    """An initializer that hangs: each start is killed after worker_start_timeout, and after the
    pool's failed starts in a row the queued job fails with WorkerStartError naming the cause,
    instead of waiting forever."""
    from shmpool import WorkerStartError

    started = tmp_path / "started"
    started.mkdir()
    pool = make_pool(1, initializer=start_when_file_exists, initargs=(str(tmp_path / "never"), str(started)),
                     worker_start_timeout=1.0)
    future = pool.submit(corejobs.add, 1, 2)
    exc = future.exception(DEADLINE)
    assert isinstance(exc, WorkerStartError), message_of(exc) if exc else "it ran"
    assert "did not become ready within 1 s" in str(exc), str(exc)

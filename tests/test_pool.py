"""The pool end to end: real workers of both kinds, real shared memory."""
from __future__ import annotations

import os
import pickle
import re
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import corejobs
from corejobs import RESULT_TIMEOUT
from shmpool import (
    CloudPickler,
    JobTimeoutError,
    PayloadTooLargeError,
    SubprocException,
    SubprocPool,
    WorkerDiedError,
    WorkerStartError,
)
from shmpool.errors import remote_error_type

SIZES = [0, 1, 1 << 10, 1 << 20, 64 << 20]


def wait_until_all_ready(pool: SubprocPool, n: int) -> None:
    """Return once ``n`` distinct workers have run a job (so each holds the next one at once)."""
    seen: set[int] = set()
    deadline = time.monotonic() + RESULT_TIMEOUT
    while len(seen) < n:
        assert time.monotonic() < deadline, f"only {len(seen)} of {n} workers came up"
        seen |= {f.result(RESULT_TIMEOUT) for f in [pool.submit(corejobs.pid_after, 0.1) for _ in range(n)]}


@pytest.mark.parametrize("size", SIZES, ids=["0B", "1B", "1KiB", "1MiB", "64MiB"])
def test_payload_round_trip(pool: SubprocPool, size: int) -> None:
    payload = os.urandom(size)
    assert pool.submit(corejobs.echo, payload).result(RESULT_TIMEOUT) == payload


@pytest.mark.slow
def test_one_gib_round_trip(make_pool) -> None:
    pool = make_pool(1, ring_size=64 << 20)  # over the ring: one-off segments both ways
    payload = np.random.default_rng(0).integers(0, 255, 1 << 30, dtype=np.uint8).tobytes()
    digest = corejobs.sha256(payload)
    assert pool.submit(corejobs.sha256, payload).result(RESULT_TIMEOUT) == digest
    back = pool.submit(corejobs.echo, payload).result(RESULT_TIMEOUT)
    assert len(back) == len(payload) and corejobs.sha256(back) == digest
    stats = pool.stats()
    assert stats.oneoff_segments == 2 and stats.bytes_from_workers > 1 << 30


def test_payload_bigger_than_the_ring_uses_a_one_off_segment(make_pool) -> None:
    pool = make_pool(1, ring_size=1 << 20)
    payload = os.urandom(3 << 20)
    assert pool.submit(corejobs.echo, payload).result(RESULT_TIMEOUT) == payload
    assert pool.stats().oneoff_segments == 1


def test_args_kwargs_and_many_jobs_from_threads(pool: SubprocPool) -> None:
    results: dict[int, int] = {}

    def client(base: int) -> None:
        futures = {i: pool.submit(corejobs.add, i, 1, scale=2) for i in range(base, base + 125)}
        for i, f in futures.items():
            results[i] = f.result(RESULT_TIMEOUT)

    threads = [threading.Thread(target=client, args=(k * 1000,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(RESULT_TIMEOUT)
    assert len(results) == 500
    assert all(v == (i + 1) * 2 for i, v in results.items())
    assert pool.stats().jobs_completed == 500


def test_jobs_run_in_other_processes_of_the_right_count(pool: SubprocPool) -> None:
    pids = {pool.submit(corejobs.sleep_then, 0.2, None) and pool.submit(corejobs.pid).result(RESULT_TIMEOUT) for _ in range(6)}
    assert os.getpid() not in pids
    assert set(pool.worker_pids()) >= pids and len(pool.worker_pids()) == 2


def test_a_raising_job_gives_subproc_exception_with_the_traceback(pool: SubprocPool) -> None:
    future = pool.submit(corejobs.boom, "no good")
    with pytest.raises(SubprocException) as info:
        future.result(RESULT_TIMEOUT)
    err = info.value
    assert type(err) is remote_error_type()  # torch's class too once torch is loaded
    assert "ValueError: no good" in err.details and "corejobs.py" in err.details and "in boom" in err.details
    assert str(err).startswith("An exception occurred in a subprocess:")
    assert err.name == "ValueError" and "Name=ValueError" in str(err)
    assert pool.submit(corejobs.add, 1, 2).result(RESULT_TIMEOUT) == 3  # the worker lives on


def test_numpy_arguments_arrive_in_place_and_results_come_back(pool: SubprocPool) -> None:
    arr = np.arange(1 << 20, dtype=np.float32)
    info = pool.submit(corejobs.array_info, arr).result(RESULT_TIMEOUT)
    assert info == {"owndata": False, "sum": float(arr.sum()), "shape": arr.shape, "dtype": "float32"}
    np.testing.assert_array_equal(pool.submit(corejobs.double, arr).result(RESULT_TIMEOUT), arr * 2)
    stats = pool.stats()
    # One copy per byte into shared memory; the worker reads the array where it lies.
    assert 1.0 <= stats.copied_to_workers / stats.bytes_to_workers < 1.01


def test_a_result_that_views_its_argument_is_sent_before_the_slot_is_reused(make_pool) -> None:
    """echo of an array returns a view into the request slot: the slot must stay the worker's
    until the result is out, even while other jobs are written into the ring behind it."""
    pool = make_pool(1, ring_size=1 << 20)
    arrays = [np.full(16 << 10, i, dtype=np.uint8) for i in range(256)]
    futures = [pool.submit(corejobs.echo, a) for a in arrays for _ in range(4)]
    for k, f in enumerate(futures):
        got = f.result(RESULT_TIMEOUT)
        assert got.shape == (16 << 10,) and (got == k // 4).all(), f"job {k} came back with another job's bytes"


def test_copies_per_byte_for_bytes_are_two_each_way(make_pool) -> None:
    pool = make_pool(1)
    payload = os.urandom(8 << 20)
    pool.submit(corejobs.echo, payload).result(RESULT_TIMEOUT)
    s = pool.stats()
    assert 1.99 < s.copied_to_workers / s.bytes_to_workers <= 2.0
    assert s.copied_from_workers / s.bytes_from_workers == 2.0
    assert s.bytes_to_workers >= len(payload) and s.bytes_from_workers >= len(payload)


def test_cloudpickle_lambdas_and_closures(make_pool) -> None:
    pool = make_pool(1, pickler=CloudPickler())
    k = 5
    assert pool.submit(lambda x: x * k, 3).result(RESULT_TIMEOUT) == 15


def test_unpicklable_job_raises_from_submit(pool: SubprocPool) -> None:
    with pytest.raises(Exception, match="lambda|pickle"):
        pool.submit(lambda: 1)
    with pytest.raises(TypeError, match="lock"):
        pool.submit(corejobs.echo, threading.Lock())
    assert pool.submit(corejobs.add, 2, 2).result(RESULT_TIMEOUT) == 4


def test_a_job_raising_while_it_views_its_array_argument_costs_no_worker(make_pool) -> None:
    pool = make_pool(1)
    first = pool.submit(corejobs.pid).result(RESULT_TIMEOUT)
    with pytest.raises(SubprocException, match="no good, first 7") as info:
        pool.submit(corejobs.boom_holding, np.full(1 << 20, 7, dtype=np.int64)).result(RESULT_TIMEOUT)
    assert info.value.name == "ValueError"
    assert pool.submit(corejobs.pid).result(RESULT_TIMEOUT) == first  # the same worker lives on


def test_unpicklable_result_fails_that_job_only(pool: SubprocPool) -> None:
    with pytest.raises(SubprocException, match="result could not be pickled") as info:
        pool.submit(corejobs.unpicklable_result).result(RESULT_TIMEOUT)
    assert "pickler=shmpool.CloudPickler()" in str(info.value)  # with what to return instead
    assert pool.submit(corejobs.add, 2, 3).result(RESULT_TIMEOUT) == 5


def test_payload_caps(make_pool) -> None:
    pool = make_pool(1, max_payload=1 << 20)
    with pytest.raises(PayloadTooLargeError, match="over the pool's max_payload of 1,048,576 bytes") as info:
        pool.submit(corejobs.echo, b"x" * (2 << 20))
    assert info.value.cap == 1 << 20 and info.value.size > 2 << 20
    with pytest.raises(SubprocException, match="PayloadTooLargeError: the job's result pickles to"):
        pool.submit(corejobs.make_bytes, 2 << 20).result(RESULT_TIMEOUT)
    assert pool.submit(corejobs.add, 1, 1).result(RESULT_TIMEOUT) == 2


def test_worker_death_fails_only_its_job_and_is_replaced(pool: SubprocPool) -> None:
    slow = pool.submit(corejobs.sleep_then, 1.0, "done")
    time.sleep(0.2)
    dying = pool.submit(corejobs.exit_now, 3)
    with pytest.raises(WorkerDiedError) as info:
        dying.result(RESULT_TIMEOUT)
    err = info.value
    assert err.exitcode == 3 and err.pid > 0 and f"worker pid {err.pid} died (exit code 3)" in str(err)
    assert slow.result(RESULT_TIMEOUT) == "done"
    assert pool.submit(corejobs.add, 1, 2).result(RESULT_TIMEOUT) == 3
    assert pool.stats().workers_died == 1


def test_killing_every_process_at_once_then_submitting_works(pool: SubprocPool, tmp_path: Path) -> None:
    wait_until_all_ready(pool, 2)
    markers = [tmp_path / f"started-{i}" for i in range(2)]
    busy = [pool.submit(corejobs.mark_then_sleep, str(m), 30) for m in markers]
    deadline = time.monotonic() + RESULT_TIMEOUT
    while not all(m.exists() for m in markers):  # kill them mid-job, not before they take it
        assert time.monotonic() < deadline, "the jobs never started"
        time.sleep(0.01)
    for pid in pool.worker_pids() + pool.helper_pids():
        os.kill(pid, 9)
    for f in busy:
        with pytest.raises(WorkerDiedError):
            f.result(RESULT_TIMEOUT)
    assert pool.submit(corejobs.add, 2, 2).result(RESULT_TIMEOUT) == 4


def test_timeout_fails_the_job_and_replaces_the_worker(make_pool) -> None:
    pool = make_pool(1)
    first = pool.submit(corejobs.pid).result(RESULT_TIMEOUT)
    with pytest.raises(JobTimeoutError, match="ran past its timeout of 0.3 s") as info:
        pool.submit_job(corejobs.sleep_then, (30,), timeout=0.3).result(RESULT_TIMEOUT)
    assert isinstance(info.value, TimeoutError)
    assert pool.submit(corejobs.pid).result(RESULT_TIMEOUT) != first


def test_memory_cap_recycles_the_worker_between_jobs(make_pool) -> None:
    pool = make_pool(1, worker_memory_cap=400 << 20)
    first = pool.submit(corejobs.hold_memory, 600 << 20).result(RESULT_TIMEOUT)  # still delivered
    assert pool.submit(corejobs.pid).result(RESULT_TIMEOUT) != first
    assert pool.stats().workers_died == 0


def test_quiesce_stops_workers_and_the_next_job_restarts_them(make_pool) -> None:
    pool = make_pool(2)
    assert pool.submit(corejobs.add, 1, 1).result(RESULT_TIMEOUT) == 2
    pool.quiesce()
    deadline = time.monotonic() + RESULT_TIMEOUT
    while pool.worker_pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.worker_pids() == []
    assert pool.submit(corejobs.add, 2, 2).result(RESULT_TIMEOUT) == 4
    pool.quiesce()
    pool.wakeup()
    deadline = time.monotonic() + RESULT_TIMEOUT
    while len(pool.worker_pids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(pool.worker_pids()) == 2


def test_quiesce_true_quiesces_by_itself_when_idle(make_pool) -> None:
    pool = make_pool(1, quiesce=True, quiesce_after=0.3)
    assert pool.submit(corejobs.add, 1, 1).result(RESULT_TIMEOUT) == 2
    deadline = time.monotonic() + RESULT_TIMEOUT
    while pool.worker_pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.worker_pids() == []
    assert pool.submit(corejobs.add, 1, 2).result(RESULT_TIMEOUT) == 3


def test_initializer_runs_in_every_worker_start(make_pool) -> None:
    pool = make_pool(1, initializer=corejobs.set_env, initargs=("SHMPOOL_TEST_INIT", "yes"), env={"SHMPOOL_TEST_ENV": "e"})
    assert pool.submit(corejobs.getenv, "SHMPOOL_TEST_INIT").result(RESULT_TIMEOUT) == "yes"
    assert pool.submit(corejobs.getenv, "SHMPOOL_TEST_ENV").result(RESULT_TIMEOUT) == "e"
    with pytest.raises(WorkerDiedError):
        pool.submit(corejobs.exit_now, 1).result(RESULT_TIMEOUT)
    assert pool.submit(corejobs.getenv, "SHMPOOL_TEST_INIT").result(RESULT_TIMEOUT) == "yes"


def test_a_failing_initializer_fails_jobs_instead_of_hanging(make_pool) -> None:
    pool = make_pool(1, initializer=corejobs.failing_initializer)
    with pytest.raises(WorkerStartError, match="initializer says no"):
        pool.submit(corejobs.add, 1, 1).result(RESULT_TIMEOUT)


def test_shutdown_fails_pending_jobs_and_is_idempotent(make_pool) -> None:
    pool = make_pool(1)
    running = pool.submit(corejobs.sleep_then, 30, None)
    queued = pool.submit(corejobs.add, 1, 1)
    time.sleep(0.2)
    started = time.monotonic()
    pool.shutdown()
    assert time.monotonic() - started < 10
    for f in (running, queued):
        assert f.done()
        with pytest.raises((RuntimeError, Exception)):
            f.result(0)
    pool.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(corejobs.add, 1, 1)


def test_shutdown_from_a_done_callback(make_pool) -> None:
    pool = make_pool(1)
    done = threading.Event()
    future = pool.submit(corejobs.add, 1, 1)
    future.add_done_callback(lambda f: (pool.shutdown(), done.set()))
    assert future.result(RESULT_TIMEOUT) == 2
    assert done.wait(RESULT_TIMEOUT)
    with pytest.raises(RuntimeError):
        pool.submit(corejobs.add, 1, 1)


def test_a_module_next_to_a_script_reaches_the_workers(make_pool, tmp_path: Path) -> None:
    (tmp_path / "scriptmod_xyz.py").write_text(textwrap.dedent("""
        def triple(x):
            return 3 * x
    """))
    sys.path.insert(0, str(tmp_path))
    try:
        import scriptmod_xyz

        pool = make_pool(1)
        assert pool.submit(scriptmod_xyz.triple, 5).result(RESULT_TIMEOUT) == 15
    finally:
        sys.path.remove(str(tmp_path))


def _only_in_main(x: int) -> int:
    return x + 1


def test_a_function_of_the_callers_main_fails_naming_the_fix(make_pool) -> None:
    # A function a script defines lives in its __main__, which no worker runs: the worker's
    # AttributeError says so and names both fixes, and CloudPickler is one that works.
    main = sys.modules["__main__"]
    name = "shmpool_test_only_in_main"
    fn = _only_in_main
    saved = fn.__module__, fn.__qualname__
    fn.__module__, fn.__qualname__ = "__main__", name
    setattr(main, name, fn)
    try:
        with pytest.raises(SubprocException) as caught:
            make_pool(1).submit(fn, 1).result(RESULT_TIMEOUT)
        assert caught.value.name == "AttributeError"
        assert "defined in the caller's __main__" in str(caught.value)
        assert "CloudPickler" in str(caught.value) and "importable module" in str(caught.value)
        assert make_pool(1, pickler=CloudPickler()).submit(fn, 1).result(RESULT_TIMEOUT) == 2
    finally:
        delattr(main, name)
        fn.__module__, fn.__qualname__ = saved


def test_a_module_the_workers_cannot_import_fails_naming_the_fix(make_pool, tmp_path: Path) -> None:
    pool = make_pool(1)
    assert pool.submit(corejobs.add, 1, 1).result(RESULT_TIMEOUT) == 2  # started before the path below
    (tmp_path / "latemod_xyz.py").write_text("def twice(x):\n    return 2 * x\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import latemod_xyz

        with pytest.raises(SubprocException) as caught:
            pool.submit(latemod_xyz.twice, 5).result(RESULT_TIMEOUT)
        assert caught.value.name == "ModuleNotFoundError"
        assert "module 'latemod_xyz' is not importable there" in str(caught.value)
        assert "sys.path before the pool starts its workers" in str(caught.value)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("latemod_xyz", None)


def test_cancelled_queued_job_never_runs(make_pool) -> None:
    pool = make_pool(1)
    blocker = pool.submit(corejobs.sleep_then, 0.5, "x")
    queued = pool.submit(corejobs.add, 1, 1)
    assert queued.cancel()
    assert blocker.result(RESULT_TIMEOUT) == "x"
    assert pool.submit(corejobs.add, 2, 2).result(RESULT_TIMEOUT) == 4
    assert pool.stats().jobs_completed == 2


@pytest.mark.parametrize(
    "kwargs, error, says",
    [
        ({"nprocs": "2"}, TypeError, "nprocs must be an int, got str '2'"),
        ({"nprocs": 2.5}, TypeError, "nprocs must be an int"),
        ({"nprocs": True}, TypeError, "nprocs must be an int"),
        ({"nprocs": 0}, ValueError, "nprocs must be at least 1"),
        ({"ring_size": "big"}, TypeError, "ring_size must be an int"),
        ({"max_payload": 0}, ValueError, "max_payload must be at least 1 bytes"),
        ({"worker_memory_cap": 1.5e9}, TypeError, "worker_memory_cap must be an int or None"),
        ({"kind": "thread"}, ValueError, "kind must be SubprocKind.FORK or SubprocKind.SPAWN"),
        ({"initializer": 3}, TypeError, "initializer must be callable"),
        ({"env": {"X": 1}}, ValueError, "env must map variable names to str values"),
        ({"env": {"A=B": "1"}}, ValueError, "env must map variable names to str values"),
    ],
)
def test_bad_pool_arguments_are_refused_with_the_cause_named(kwargs: dict, error: type, says: str) -> None:
    # Refused in the constructor, before any process starts: a worker that failed on them (an
    # int in os.environ, a str count) would only be seen as a start failure, far from the cause.
    kwargs = {"nprocs": 1, **kwargs}
    with pytest.raises(error, match=re.escape(says)):
        SubprocPool(kwargs.pop("nprocs"), **kwargs)


def test_a_job_that_cannot_be_pickled_raises_from_submit_with_the_fix(pool: SubprocPool) -> None:
    local = lambda x: x  # noqa: E731
    with pytest.raises((AttributeError, pickle.PicklingError)) as caught:
        pool.submit(local, 1)
    assert any("pickler=shmpool.CloudPickler()" in note for note in getattr(caught.value, "__notes__", []))
    with pytest.raises(TypeError, match="cannot pickle '_thread.lock'") as caught:
        pool.submit(len, threading.Lock())
    assert any("cannot be sent to another process" in note for note in caught.value.__notes__)
    with pytest.raises(TypeError, match="job_fn must be callable, got int 5"):
        pool.submit(5)  # type: ignore[arg-type]
    assert pool.stats().jobs_submitted == 0
    assert pool.submit(corejobs.add, 1, 2).result(RESULT_TIMEOUT) == 3

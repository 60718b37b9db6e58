"""JobFuture: a concurrent.futures.Future in every behaviour callers and the standard library
rely on, built from a handful of objects instead of a dozen."""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import gc
import operator
import threading
import time

import pytest

import corejobs
from corejobs import RESULT_TIMEOUT
from shmpool.futures import JobFuture

KINDS = [JobFuture, cf.Future]  # every behaviour below is checked against the standard one too


@pytest.mark.parametrize("make", KINDS)
def test_result_exception_and_states(make) -> None:
    f = make()
    assert not f.done() and not f.running() and not f.cancelled()
    with pytest.raises(cf.TimeoutError):
        f.result(timeout=0.01)
    with pytest.raises(cf.TimeoutError):
        f.exception(timeout=0)
    assert f.set_running_or_notify_cancel() is True and f.running()
    assert not f.cancel()
    f.set_result(7)
    assert f.done() and f.result() == 7 and f.exception() is None
    with pytest.raises(cf.InvalidStateError):
        f.set_result(8)
    with pytest.raises(cf.InvalidStateError):
        f.set_exception(ValueError())
    with pytest.raises(RuntimeError):
        f.set_running_or_notify_cancel()
    assert "finished returned int" in repr(f)

    g = make()
    g.set_exception(KeyError("k"))
    assert isinstance(g.exception(), KeyError)
    with pytest.raises(KeyError):
        g.result()
    assert "raised KeyError" in repr(g)


@pytest.mark.parametrize("make", KINDS)
def test_cancel(make) -> None:
    f = make()
    seen: list[object] = []
    f.add_done_callback(seen.append)
    assert f.cancel() and f.cancel() and f.cancelled() and seen == [f]
    with pytest.raises(cf.CancelledError):
        f.result(0)
    with pytest.raises(cf.InvalidStateError):
        f.set_result(1)
    assert f.set_running_or_notify_cancel() is False  # -> CANCELLED_AND_NOTIFIED
    done, _ = cf.wait([f], timeout=0)
    assert done == {f}


@pytest.mark.parametrize("make", KINDS)
def test_callbacks_run_once_in_order_and_late_ones_at_once(make) -> None:
    f = make()
    seen: list[str] = []
    f.add_done_callback(lambda _f: seen.append("a"))
    f.add_done_callback(lambda _f: seen.append("b"))
    f.set_result(None)
    f.add_done_callback(lambda _f: seen.append("late"))
    assert seen == ["a", "b", "late"]


@pytest.mark.parametrize("make", KINDS)
def test_a_waiting_thread_is_woken_and_a_timed_out_one_leaves_nothing(make) -> None:
    f = make()
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(f.result(RESULT_TIMEOUT)))
    waiter.start()
    with pytest.raises(cf.TimeoutError):
        f.result(timeout=0.05)  # a second waiter that gives up
    time.sleep(0.05)
    f.set_result("v")
    waiter.join(RESULT_TIMEOUT)
    assert got == ["v"]


def test_wait_and_as_completed_over_job_and_plain_futures() -> None:
    futures = [JobFuture(), cf.Future(), JobFuture(), cf.Future()]
    threading.Timer(0.05, futures[2].set_result, (2,)).start()
    done, pending = cf.wait(futures, timeout=RESULT_TIMEOUT, return_when=cf.FIRST_COMPLETED)
    assert done == {futures[2]} and len(pending) == 3
    for i in (0, 1):
        threading.Timer(0.02 * (i + 1), futures[i].set_result, (i,)).start()
    futures[3].set_exception(ValueError())
    done, _ = cf.wait(futures, timeout=RESULT_TIMEOUT, return_when=cf.FIRST_EXCEPTION)
    assert futures[3] in done
    assert sorted(f.result() for f in cf.as_completed(futures[:3], timeout=RESULT_TIMEOUT)) == [0, 1, 2]
    assert not futures[0]._waiters  # as_completed took its waiter back


def test_asyncio_wraps_a_job_future() -> None:
    f = JobFuture()

    async def main() -> object:
        asyncio.get_running_loop().call_later(0.02, f.set_result, "async")
        return await asyncio.wait_for(asyncio.wrap_future(f), RESULT_TIMEOUT)

    assert asyncio.run(main()) == "async"


def test_a_pending_job_holds_few_objects_the_collector_tracks(make_pool) -> None:
    """With torch loaded (160k+ long-lived objects), a full collection takes 100-200 ms, and a
    burst of jobs sets one off once the objects it keeps alive reach a quarter of that. Before
    JobFuture was made light, each pending job kept 16 tracked objects alive, and every second
    burst of 3,000 jobs paid for a full collection."""
    pool = make_pool(1)
    pool.submit(operator.add, 1, 1).result(RESULT_TIMEOUT)
    blocker = pool.submit(corejobs.sleep_then, 1.0)  # the rest wait behind it
    gc.collect()
    before = len(gc.get_objects())
    futures = [pool.submit(operator.add, i, 1) for i in range(2000)]
    gc.collect()  # what a collection finds alive (it also stops tracking tuples of plain values)
    per_job = (len(gc.get_objects()) - before - 1) / len(futures)
    assert not blocker.done(), "the jobs must still be pending when counted"
    assert per_job <= 6, f"{per_job:.1f} tracked objects per pending job"
    assert [f.result(RESULT_TIMEOUT) for f in futures] == [i + 1 for i in range(2000)]

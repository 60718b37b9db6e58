"""Regression tests for round 3 of the hardening review (R3-1 .. R3-7): one test (or one parametrized
table) per defect, each named after it.

Every wait has a deadline (hardutil.result_within / exception_within / assert_all_resolve), so a hang
fails as "... did not resolve within N s", never as the pytest-timeout backstop.  Pool tests run under
both start kinds (the `kind` fixture).  Races are made deterministic by construction: a gate job that
holds the worker until the test has placed everything, a trace function or a wrapped lock that fires at
one exact point of submit().

Expectations (the fixes should match them):
* R3-1: a worker never holds a short job's reply back across a long job: the replies of the tiny jobs
  run just before a slow job arrive well before it ends; a job's timeout counts from its own start,
  not from the held replies' arrival; a crash fails only the crashing job;
* R3-2: an exception at any point of submit() (raised there, or by a Python signal handler there)
  leaves the pool usable: submit raises it, or returns a future that resolves (a deferred handler may
  raise out of submit() after the job was placed); jobs submitted afterwards complete;
* R3-3: a done-callback raising SystemExit costs nothing but itself: every other future of a burst
  resolves with its value and the pool takes jobs afterwards;
* R3-4: a result whose unpickling in the parent raises SystemExit / KeyboardInterrupt fails that job
  (with an exception, promptly); a job running meanwhile on the other worker returns its value; the pool
  goes on;
* R3-5: a pickler overriding only dumps/loads (torch's contract) gets `bytes` in loads, and a loads
  whose arrays view `data` never sees later jobs' bytes (worker and parent side);
* R3-6: the parent out of file descriptors when a result's memfd arrives: that job fails with
  SharedMemoryError naming file descriptors; no worker is killed; the next job works;
* R3-7: a queued future cancel()led before shutdown() is seen as done by concurrent.futures.wait() and
  as_completed().
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import os
import resource
import signal
import sys
import threading
import time

import numpy as np
import pytest

import jobs
import picklers
from hardutil import (
    JOB_DEADLINE, assert_all_resolve, call_with_deadline, error_text, exception_within, result_within, wait_for,
    warm,
)

pytestmark = pytest.mark.timeout(120)

KiB = 1 << 10
MiB = 1 << 20
RING = 1 << 20  # the smallest ring the pool allows
# A wait that must not block: a correct pool answers a tiny job on a warm worker in milliseconds.
HANG_DEADLINE = 10.0
# R3-2: tiny jobs on a warm, idle, single worker: a hang shows here (shorter, 8 cases x 2 kinds).
PROMPT = 5.0


def _sha1(data) -> str:
    return hashlib.sha1(memoryview(data).cast("B")).hexdigest()


def _teach_short_jobs(pool, rounds: int = 3, n: int = 500) -> None:
    """Bursts of tiny jobs, waited for: the pool's running job time drops under its 'short' bound, so
    it stacks jobs in a worker's ring behind each other (and the worker holds short jobs' replies)."""
    for r in range(rounds):
        outcomes = assert_all_resolve([pool.submit(jobs.add, i, 1) for i in range(n)], JOB_DEADLINE, "warm-up job")
        assert outcomes == [("ok", i + 1) for i in range(n)], f"warm-up round {r}"


# --- R3-1: a short job's held reply waits behind a long job -------------------------------------------
SLOW_SECONDS = 3.0
TINY_BEFORE_MARGIN = 1.5  # seconds after the gate opens by which the tiny jobs before the slow one resolve


@pytest.mark.parametrize("fate", ["slow", "timeout", "crash", "gil", "gil-timeout"])
def test_r3_1_held_replies_are_not_kept_behind_a_long_job(shmpool_mod, make_pool, kind, tmp_path, fate):
    """R3-1. One worker, taught that jobs are short (bursts of tiny jobs, one of 300 among them).  Then
    a gate job holds the worker while the test queues 8 tiny jobs, one slow job and 300 more tiny jobs:
    the pool stacks them behind the gate and, once the gate opens (it runs 50 ms at least: a long job,
    whose own reply is never held), sends them to the worker together, so
    the worker finishes the 8 tiny jobs right before it starts the slow one, with their replies held
    back (today's 'short job, more queued' rule).  Deterministic by construction.
      slow:    the slow job sleeps 3 s: every tiny job before it must resolve within 1.5 s of the gate
               opening (today: at 3 s, when the slow job's reply flushes the held ones);
      timeout: the same job with submit_job(timeout=1.0) must fail with JobTimeoutError (today its
               clock starts only when the held replies arrive: it returns 'slow' at 3 s);
      crash:   the job segfaults: it alone fails (WorkerDiedError); every tiny job before it returns
               its value (today the held replies die with the worker: those jobs fail too);
      gil:     the job sleeps 3 s in a C call that keeps the GIL (no other thread of the worker's could
               run): the tiny jobs still resolve within 1.5 s (the parent reads the worker's journal);
      gil-timeout: the same, with timeout=1.0 on the tiny jobs: none of them, all finished, may
               fail with JobTimeoutError, and the GIL-holding job returns (its worker is not killed).
    In every case the 300 jobs after it complete (on a replacement worker after a crash/timeout)."""
    sp = shmpool_mod
    pool = make_pool(1, kind=kind)
    result_within(pool.submit(jobs.getpid), JOB_DEADLINE, "the first job")
    _teach_short_jobs(pool)
    burst = [pool.submit(jobs.add, i, 1) for i in range(300)]
    assert assert_all_resolve(burst, JOB_DEADLINE, "burst job") == [("ok", i + 1) for i in range(300)]

    go, started = tmp_path / "go", tmp_path / "started"
    gate = pool.submit(jobs.wait_for_file, str(go), 20.0, "gate", str(started), 0.05)
    tiny_timeout = 1.0 if fate == "gil-timeout" else None
    tiny_before = [pool.submit_job(jobs.add, (i, 1000), timeout=tiny_timeout) for i in range(8)]
    if fate == "slow":
        slow = pool.submit(jobs.sleep_return, SLOW_SECONDS, "slow")
    elif fate == "timeout":
        slow = pool.submit_job(jobs.sleep_return, (SLOW_SECONDS, "slow"), timeout=1.0)
    elif fate.startswith("gil"):
        slow = pool.submit(jobs.sleep_holding_the_gil, SLOW_SECONDS, "slow")
    else:
        slow = pool.submit(jobs.run_and_fail, "segfault", None)
    tiny_after = [pool.submit(jobs.add, i, 2000) for i in range(300)]
    stamps: dict[int, float] = {}
    for i, f in enumerate(tiny_before):
        f.add_done_callback(lambda f, i=i: stamps.setdefault(i, time.monotonic()))
    assert not any(f.done() for f in tiny_before), "a tiny job finished although the gate was closed"
    wait_for(started.exists, HANG_DEADLINE, "the gate job to start")  # so it is a long job, not a held short one

    opened = time.monotonic()
    go.write_text("go")
    assert result_within(gate, HANG_DEADLINE, "the gate job") == "gate"
    outcomes = assert_all_resolve(tiny_before, HANG_DEADLINE, "tiny job before the slow one")
    wrong = [(i, k, error_text(v).splitlines()[0] if k == "error" else v)
             for i, (k, v) in enumerate(outcomes) if (k, v) != ("ok", i + 1000)]
    assert not wrong, f"tiny jobs run just before the {fate} job that did not return their value: {wrong}"
    late = {i: round(t - opened, 2) for i, t in stamps.items() if t - opened > TINY_BEFORE_MARGIN}
    assert not late, (f"tiny jobs run just before the {fate} job resolved only (s after the gate opened) {late}: "
                      f"their replies were held back behind it")

    exc = exception_within(slow, SLOW_SECONDS + HANG_DEADLINE, f"the {fate} job")
    if fate in ("slow", "gil", "gil-timeout"):
        assert exc is None, error_text(exc)
        assert slow.result(timeout=0) == "slow"
    elif fate == "timeout":
        assert exc is not None, f"the job with timeout=1.0 returned {slow.result(timeout=0)!r} after {SLOW_SECONDS} s"
        assert isinstance(exc, sp.JobTimeoutError), error_text(exc)
    else:
        assert isinstance(exc, sp.WorkerDiedError), error_text(exc) if exc else slow.result(timeout=0)

    outcomes = assert_all_resolve(tiny_after, JOB_DEADLINE, "tiny job after the slow one")
    wrong = [(i, k, error_text(v).splitlines()[0] if k == "error" else v)
             for i, (k, v) in enumerate(outcomes) if (k, v) != ("ok", i + 2000)]
    assert not wrong, f"{len(wrong)} of 300 tiny jobs after the {fate} job did not return their value: {wrong[:5]}"
    make_pool.note(pool)


def test_r3_1_reply_sent_just_before_a_crash_is_read(shmpool_mod, make_pool, kind, tmp_path):
    """R3-1 (c), the parent's side.  A reply the worker *sent* (not held) just before it crashed must still
    be read.  When the worker dies with headers of its own unread (jobs stacked behind the crash),
    AF_UNIX SOCK_SEQPACKET reports ECONNRESET on the parent's next recv ahead of the messages still
    queued to it; today recv_headers() takes that for EOF and the queued reply is lost: its job fails
    with WorkerDiedError although it returned.
    Deterministic: a gate job's done-callback (run by the thread that resolves it: the dispatcher) sleeps
    1 s, so the dispatcher is not reading while the worker answers a 10 ms job (too long to be held),
    then segfaults with ~60 stacked headers unread."""
    sp = shmpool_mod
    pool = make_pool(1, kind=kind)
    result_within(pool.submit(jobs.getpid), JOB_DEADLINE, "the first job")
    _teach_short_jobs(pool, rounds=2)
    go, started = tmp_path / "go", tmp_path / "started"
    gate = pool.submit(jobs.wait_for_file, str(go), 20.0, "gate", str(started), 0.05)
    answered = pool.submit(jobs.sleep_return, 0.01, "answered")
    crash = pool.submit(jobs.run_and_fail, "segfault", None)
    behind = [pool.submit(jobs.add, i, 3000) for i in range(300)]
    stalled = []

    def stall_the_dispatcher(f):
        stalled.append(threading.current_thread().name)
        time.sleep(1.0)

    assert not gate.done()
    gate.add_done_callback(stall_the_dispatcher)
    wait_for(started.exists, HANG_DEADLINE, "the gate job to start")
    go.write_text("go")
    assert result_within(gate, HANG_DEADLINE, "the gate job") == "gate"
    exc = exception_within(answered, HANG_DEADLINE, "the job answered just before the crash")
    assert exc is None, (f"a job whose reply was sent before its worker crashed failed "
                         f"(callback ran in {stalled}): {error_text(exc)}")
    assert answered.result(timeout=0) == "answered"
    exc = exception_within(crash, HANG_DEADLINE, "the crashing job")
    assert isinstance(exc, sp.WorkerDiedError), error_text(exc) if exc else crash.result(timeout=0)
    outcomes = assert_all_resolve(behind, JOB_DEADLINE, "job behind the crash")
    wrong = [(i, k) for i, (k, v) in enumerate(outcomes) if (k, v) != ("ok", i + 3000)]
    assert not wrong, f"{len(wrong)} of 300 jobs behind the crash did not return their value: {wrong[:5]}"
    make_pool.note(pool)


# --- R3-2: an exception inside submit() between noting a job and announcing it -------------------------
class _Injected(Exception):
    """What the test raises inside submit() (as a signal handler's exception would be)."""


class _LockThatFiresOnRelease:
    """Wraps the pool's lock (the *same* lock underneath, so mutual exclusion is unchanged): when the main
    thread leaves a `with` block on it in shmpool/pool.py while armed, it calls `fire` right after the
    release, i.e. right after the lock is released and before anything that follows in submit()."""

    def __init__(self, real, fire):
        self._real = real
        self._fire = fire
        self.armed = False
        self.fired = False

    def acquire(self, *args, **kwargs):
        return self._real.acquire(*args, **kwargs)

    def release(self):
        self._real.release()

    def locked(self):
        return self._real.locked()

    def _is_owned(self):  # the pool asks it, to refuse a call back into itself (core.refuse_reentry)
        return self._real._is_owned()

    def __enter__(self):
        return self._real.__enter__()

    def __exit__(self, *exc):
        self._real.release()
        if self.armed and exc[0] is None and threading.current_thread() is threading.main_thread():
            caller = sys._getframe(1).f_code
            if caller.co_filename.replace(os.sep, "/").endswith("shmpool/pool.py"):
                self.armed = False
                self.fired = True
                self._fire()
        return False


@pytest.mark.parametrize("how", ["raise", "signal"])
@pytest.mark.parametrize("point", ["commit", "unlock"])
def test_r3_2_exception_inside_submit_leaves_pool_usable(make_pool, kind, point, how):
    """R3-2. An exception lands inside submit() of a job bound for an idle single worker, at one exact
    point (deterministic, no timing luck):
      point "commit": when core.place calls move_job (the job already noted in the worker's
                      in-flight queue, its header not yet announced), caught with sys.settrace;
      point "unlock": right after submit's placement releases the pool lock (in pool.py's
                      _place_at_once) and before the header is sent, via a wrapper around the lock;
      how "raise":    the exception is raised right there;
      how "signal":   a real SIGUSR1, whose Python handler raises, is sent to this process right there
                      (the handler runs at the next bytecode boundary, or later if the pool defers
                      signal handlers across its critical steps).
    Either submit() raises the exception, or it returns a future that must resolve; and jobs submitted
    afterwards must complete promptly (today: the worker is left waiting for a header that never comes,
    or marked as having one unsent, and every later job hangs)."""
    pool = make_pool(1, kind=kind, ring_size=RING)
    result_within(pool.submit(jobs.getpid), JOB_DEADLINE, "the first job")
    assert result_within(pool.submit(jobs.add, 1, 1), PROMPT, "a warm-up job") == 2  # idle again: placed at once
    handled = []
    main = threading.main_thread()

    def on_usr1(signum, frame):
        handled.append(threading.current_thread().name)
        raise _Injected("raised by a SIGUSR1 handler inside submit() (test)")

    def fire():
        if how == "raise":
            raise _Injected(f"raised inside submit() at {point!r} (test)")
        os.kill(os.getpid(), signal.SIGUSR1)

    fired = []

    def tracer(frame, event, arg):
        if (event == "call" and frame.f_code.co_name == "move_job" and frame.f_back is not None
                and frame.f_back.f_code.co_name == "place" and threading.current_thread() is main):
            sys.settrace(None)
            fired.append(point)
            fire()
        return None

    old_handler = signal.signal(signal.SIGUSR1, on_usr1)
    old_trace = sys.gettrace()
    core = pool._core
    real_lock = core.lock
    wrapper = _LockThatFiresOnRelease(real_lock, fire) if point == "unlock" else None
    submitted = None
    raised = None
    try:
        if wrapper is not None:
            core.lock = wrapper
            wrapper.armed = True
        else:
            sys.settrace(tracer)
        try:
            submitted = pool.submit(jobs.add, 2, 2)
        except _Injected as e:
            raised = e
        finally:
            sys.settrace(old_trace)
            if wrapper is not None:
                wrapper.armed = False
                if wrapper.fired:
                    fired.append(point)
        if how == "signal" and not handled:
            end = time.monotonic() + 1.0  # a deferred handler runs at the next bytecode boundary
            while not handled and time.monotonic() < end:
                try:
                    time.sleep(0.01)
                except _Injected as e:
                    raised = raised or e
    finally:
        core.lock = real_lock
        signal.signal(signal.SIGUSR1, old_handler)
    assert fired, (f"the injection point {point!r} was never reached inside submit(): shmpool's structure "
                   f"changed, update this test")
    if how == "signal":
        assert handled == [main.name], f"the SIGUSR1 handler ran {len(handled)} times, in {handled}"
    if submitted is not None:
        outcome = assert_all_resolve([submitted], PROMPT, "future that submit() returned")[0]
        assert outcome[0] != "ok" or outcome[1] == 4, outcome
    else:
        assert raised is not None
    for i in range(5):
        got = result_within(pool.submit(jobs.add, i, 10), PROMPT,
                            f"job {i} submitted after the exception at {point!r} ({how}) inside submit()")
        assert got == i + 10
    assert_all_resolve([pool.submit(jobs.add, i, 20) for i in range(50)], PROMPT, "later burst job")


# --- R3-3: a done-callback raising SystemExit -----------------------------------------------------------
def test_r3_3_done_callback_sys_exit_costs_only_itself(make_pool, kind, tmp_path):
    """R3-3. Two workers, taught that jobs are short, each held by a gate job while 3000 tiny jobs are
    submitted; a done-callback calling sys.exit() is added to the 1501st (certainly not done yet: the
    gates are closed).  Then the gates open.  Every future, that one included, must resolve with its
    value, and the pool must take jobs afterwards (today the SystemExit escapes the thread resolving
    futures: the rest of its batch never resolves, or the pool is shut down: 'after shutdown()')."""
    pool = make_pool(2, kind=kind)
    assert len(warm(pool, 2)) == 2
    make_pool.note(pool)
    _teach_short_jobs(pool, rounds=2)
    go = tmp_path / "go"
    gates = [pool.submit(jobs.wait_for_file, str(go), 20.0, f"gate{g}") for g in range(2)]
    fs = [pool.submit(jobs.add, i, 1) for i in range(3000)]
    victim = fs[1500]
    assert not victim.done(), "a job finished although both workers were held by gates"
    called = []

    def bail(f):
        called.append(threading.current_thread().name)
        sys.exit("a done-callback gave up (test)")

    victim.add_done_callback(bail)
    go.write_text("go")
    assert assert_all_resolve(gates, HANG_DEADLINE, "gate job") == [("ok", "gate0"), ("ok", "gate1")]
    outcomes = assert_all_resolve(fs, HANG_DEADLINE, "burst job")
    wrong = [(i, k, error_text(v).splitlines()[0] if k == "error" else v)
             for i, (k, v) in enumerate(outcomes) if (k, v) != ("ok", i + 1)]
    assert not wrong, f"{len(wrong)} of 3000 futures did not get their value after a callback's SystemExit: {wrong[:5]}"
    assert len(called) == 1, f"the callback ran {len(called)} times"
    try:
        later = pool.submit(jobs.add, 1, 2)
    except RuntimeError as e:
        raise AssertionError(f"the pool is unusable after a done-callback's SystemExit: {e}") from None
    assert result_within(later, HANG_DEADLINE, "a job after the callback's SystemExit") == 3
    more = assert_all_resolve([pool.submit(jobs.add, i, 5) for i in range(200)], HANG_DEADLINE, "later job")
    assert more == [("ok", i + 5) for i in range(200)]
    make_pool.note(pool)


def test_r3_3_main_thread_callback_exit_is_raised_after_every_future_settles(make_pool, kind):
    """R3-3, main thread: shutdown() from the main thread fails the queued jobs there, so their
    done-callbacks run in it. One raising SystemExit is the caller's own: shutdown() raises it, but
    only after every other queued future has been resolved (wait() sees them all done)."""
    pool = make_pool(1, kind=kind)
    busy = pool.submit(jobs.sleep_return, 1.0, "busy")
    queued = [pool.submit(jobs.add, i, 1) for i in range(5)]
    queued[1].add_done_callback(lambda f: sys.exit("the caller's own exit"))
    with pytest.raises(SystemExit):
        pool.shutdown()
    done, not_done = cf.wait(queued + [busy], timeout=HANG_DEADLINE)
    assert not not_done, f"{len(not_done)} futures left unresolved after a callback's SystemExit"


def test_r3_3_a_callback_waiting_for_the_same_pool_gets_an_error_not_a_hang(make_pool, kind):
    """R3-3, waits: a done-callback (run on the dispatcher thread, which delivers results) that waits
    for another job of the same pool could never be answered; it gets RuntimeError at once, and the
    pool goes on (before: that job and every later one hung)."""
    pool = make_pool(1, kind=kind)
    result_within(pool.submit(jobs.getpid), JOB_DEADLINE, "the first job")
    seen: list[BaseException | object] = []

    def waits(f):
        try:
            seen.append(pool.submit(jobs.add, 2, 2).result())
        except BaseException as e:
            seen.append(e)

    first = pool.submit(jobs.sleep_return, 0.2, "first")
    first.add_done_callback(waits)
    assert result_within(first, HANG_DEADLINE, "the job with the waiting callback") == "first"
    wait_for(lambda: seen, HANG_DEADLINE, "the callback to return")
    assert isinstance(seen[0], RuntimeError) and "add_done_callback" in str(seen[0]), seen
    assert result_within(pool.submit(jobs.add, 3, 4), HANG_DEADLINE, "a job after the callback") == 7


def test_r3_3_a_signal_handler_calling_the_pool_while_it_holds_its_lock(kind):
    """R3-3, signals: a SIGUSR1 handler that calls pool.shutdown() lands while the main thread holds
    the pool's lock (inside worker_pids(), placed there with a trace function): the handler waits
    for the lock to be released, then shuts the pool down (before: it waited for a lock its own
    thread held, forever)."""
    from test_hard_defects import run_script

    out, _ = run_script("""
        import threading
        pool = SubprocPool(1, kind=SubprocKind({kind!r}))
        pool.submit(jobs.getpid).result(timeout=30)
        handled = []
        def on_usr1(signum, frame):
            pool.shutdown(wait=False)
            handled.append(1)
        signal.signal(signal.SIGUSR1, on_usr1)
        time.sleep(0.1)  # set at start-up, as a SIGTERM handler is: past interrupts.RESCAN_SECONDS
        fired = []
        def tracer(frame, event, arg):
            if event == "call" and frame.f_back is not None and frame.f_back.f_code.co_name == "worker_pids" \
                    and not fired:
                fired.append(1)
                os.kill(os.getpid(), signal.SIGUSR1)
            return None
        sys.settrace(tracer)
        try:
            pids = pool.worker_pids()
        finally:
            sys.settrace(None)
        for _ in range(1000):
            pass
        try:
            pool.submit(jobs.getpid)
            after = "submit worked"
        except RuntimeError as e:
            after = str(e)
        report(fired=len(fired), handled=len(handled), pids=len(pids), after=after)
        """, timeout=60.0, kind=kind.value)
    assert out["fired"] == 1, "the signal was not sent from inside worker_pids(): update this test"
    assert out["handled"] == 1, out
    assert "after shutdown" in out["after"], out


# --- R3-4: the parent's unpickling of a result raises a BaseException ---------------------------------
@pytest.mark.parametrize("which", ["exit", "kbi"])
def test_r3_4_result_unpickling_base_exception_fails_that_job_only(make_pool, kind, which):
    """R3-4. Two warm workers.  A healthy job (sleeps 1 s) runs on one; a job on the other returns an
    object whose unpickling in the parent raises SystemExit ("exit") or KeyboardInterrupt ("kbi"), both
    BaseExceptions that are not Exceptions.  That job must fail with an exception within a deadline
    (today the error escapes the dispatcher: the future never resolves and the pool is dead); the healthy
    job must return its value; later jobs must work."""
    pool = make_pool(2, kind=kind)
    assert len(warm(pool, 2)) == 2
    make_pool.note(pool)
    healthy = pool.submit(jobs.sleep_return, 1.0, "healthy")
    bad = pool.submit(jobs.return_base_exception_on_load, which)
    exc = exception_within(bad, HANG_DEADLINE, f"the job whose result raises {which!r} when unpickled")
    assert exc is not None, f"the result that cannot be unpickled came back as {bad.result(timeout=0)!r}"
    assert not healthy.done() or healthy.exception(timeout=0) is None, \
        f"the healthy job failed: {error_text(healthy.exception(timeout=0))}"
    assert result_within(healthy, HANG_DEADLINE, "the healthy job running meanwhile") == "healthy"
    try:
        later = [pool.submit(jobs.add, i, 1) for i in range(20)]
    except RuntimeError as e:
        raise AssertionError(f"the pool is unusable after a result raised {which!r} when unpickled: {e}") from None
    assert assert_all_resolve(later, HANG_DEADLINE, "later job") == [("ok", i + 1) for i in range(20)]
    make_pool.note(pool)


# --- R3-5: a pickler with torch's contract (dumps/loads only) -----------------------------------------
def test_r3_5_strict_pickler_gets_bytes_in_loads(make_pool, kind):
    """R3-5. A pickler that overrides only dumps/loads and relies on loads(data: bytes) (torch's
    contract: `data.startswith(...)`, `isinstance(data, bytes)`) must work both ways, for payloads in the
    ring and over it (today loads gets a memoryview of ring memory: AttributeError in the worker)."""
    pool = make_pool(1, kind=kind, ring_size=RING, pickler=picklers.StrictPickler())
    assert result_within(pool.submit(jobs.add, 1, 2), JOB_DEADLINE, "a tiny job through StrictPickler") == 3
    big = jobs.pattern(3 * MiB, 5)  # over the 1 MiB ring: one-off segments both ways
    assert result_within(pool.submit(jobs.identity, big), HANG_DEADLINE, "a 3 MiB job through StrictPickler") == big
    arr = np.frombuffer(jobs.pattern(300 * KiB, 6), dtype=np.uint8).copy()
    got = result_within(pool.submit(jobs.identity, arr), HANG_DEADLINE, "a 300 KiB array through StrictPickler")
    assert isinstance(got, np.ndarray) and np.array_equal(got, arr)


def test_r3_5_zero_copy_loads_never_sees_later_jobs_bytes(make_pool, kind):
    """R3-5. A pickler with torch's contract whose loads rebuilds numpy arrays as views of `data`
    (PEP 574 buffers, as a zero-copy torch pickler does): safe only if `data` is a bytes of its own.
      parent side: a 100 KB result array held by the caller must keep its values while 10 later jobs
                   return other arrays (today it views the response ring: it shows the last job's);
      worker side: an argument a job keeps (module global) must keep its values while 10 later jobs
                   send other arrays (today it views the request ring), and an argument must not change
                   under a running job while jobs are queued behind it."""
    n = 100_000
    pool = make_pool(1, kind=kind, ring_size=RING, pickler=picklers.ZeroCopyPickler())
    r1 = result_within(pool.submit(jobs.full_array, n, 1), JOB_DEADLINE, "the first array job")
    assert isinstance(r1, np.ndarray) and r1.nbytes == n
    want = _sha1(r1.copy())
    for v in range(2, 12):
        r = result_within(pool.submit(jobs.full_array, n, v), HANG_DEADLINE, f"array job {v}")
        assert int(r.min()) == int(r.max()) == v, v
    assert (int(r1.min()), int(r1.max())) == (1, 1) and _sha1(r1) == want, \
        f"a result the caller holds changed under it: min/max {int(r1.min())}/{int(r1.max())}, expected 1/1"

    kept = np.full(n, 5, np.uint8)
    assert result_within(pool.submit(jobs.keep_and_digest, kept), HANG_DEADLINE, "the job that keeps its argument") \
        == _sha1(kept)
    for v in range(6, 16):
        a = np.full(n, v, np.uint8)
        assert result_within(pool.submit(jobs.bytes_digest, a), HANG_DEADLINE, f"job {v}") == _sha1(a)
    assert result_within(pool.submit(jobs.kept_digest), HANG_DEADLINE, "kept_digest") == _sha1(kept), \
        "an argument a job kept in the worker was overwritten by later jobs' bytes"

    held = np.full(n, 7, np.uint8)
    during = pool.submit(jobs.sleep_then_digest, 0.3, held)
    behind = [pool.submit(jobs.bytes_digest, np.full(n, 9, np.uint8)) for _ in range(3)]
    assert result_within(during, HANG_DEADLINE, "the job holding its argument") == _sha1(held), \
        "a running job's argument changed while jobs were queued behind it"
    assert assert_all_resolve(behind, HANG_DEADLINE, "queued job") == [("ok", _sha1(np.full(n, 9, np.uint8)))] * 3


# --- R3-6: the parent is out of file descriptors when a result's memfd arrives -------------------------
def test_r3_6_parent_out_of_fds_fails_that_job_only(shmpool_mod, make_pool, kind):
    """R3-6. One warm worker, a 1 MiB ring.  The parent's RLIMIT_NOFILE is lowered to its lowest free fd
    (no new fd can be had) while a 3 MiB result (over the ring: it comes with its memfd, SCM_RIGHTS)
    arrives.  That job must fail with SharedMemoryError whose message speaks of file descriptors
    ('file descriptor' or 'ulimit -n'); no worker is killed (workers_died stays 0, same pid; today the
    truncated message counts as a protocol error and the worker is SIGKILLed); once the limit is restored
    the next job runs on the same worker."""
    sp = shmpool_mod
    pool = make_pool(1, kind=kind, ring_size=RING)
    pid = result_within(pool.submit(jobs.getpid), JOB_DEADLINE, "the first job")
    make_pool.note(pool)
    died_before = pool.stats().workers_died
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    probe = os.open(os.devnull, os.O_RDONLY)
    os.close(probe)  # `probe` is now the lowest free fd number: a limit of it allows no new fd
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (probe, hard))
        fut = pool.submit(jobs.make_bytes, 3 * MiB)
        exc = exception_within(fut, HANG_DEADLINE, "the 3 MiB result sent to a parent out of fds")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert exc is not None, "the 3 MiB result arrived although the parent could not receive its memfd"
    assert isinstance(exc, sp.SharedMemoryError), error_text(exc)
    msg = str(exc).lower()
    assert "file descriptor" in msg or "ulimit -n" in msg, f"the error does not name the cause: {exc}"
    assert pool.stats().workers_died == died_before, f"a worker was killed: {pool.stats()}"
    assert pool.worker_pids() == [pid], f"the worker was replaced: {pool.worker_pids()} (was {pid})"
    assert result_within(pool.submit(jobs.getpid), HANG_DEADLINE, "the next job") == pid
    big = result_within(pool.submit(jobs.make_bytes, 3 * MiB), HANG_DEADLINE, "a 3 MiB result after the limit is restored")
    assert big == b"\x5a" * (3 * MiB)


# --- R3-7: a cancelled queued future, then shutdown() -----------------------------------------------------
def test_r3_7_cancelled_queued_future_is_seen_done_after_shutdown(make_pool, kind):
    """R3-7. One worker busy with a 1 s job; a second job waits in the queue and is cancel()led (True);
    then shutdown().  concurrent.futures.wait([f], timeout=5) must report it done and as_completed must
    yield it (today it stays CANCELLED, never CANCELLED_AND_NOTIFIED, and both wait it out)."""
    pool = make_pool(1, kind=kind)
    busy = pool.submit(jobs.sleep_return, 1.0, "busy")  # no short job seen yet: nothing stacks behind it
    queued = pool.submit(jobs.add, 1, 2)
    assert queued.cancel() is True, "the queued job could not be cancelled (was it placed behind the busy one?)"
    call_with_deadline(pool.shutdown, 20.0, "pool.shutdown()")
    done, not_done = cf.wait([queued], timeout=5)
    assert queued in done, f"wait() does not see the cancelled future done after shutdown() (state {queued._state})"
    try:
        got = list(cf.as_completed([queued], timeout=3))
    except cf.TimeoutError:
        raise AssertionError("as_completed() never yields the cancelled future") from None
    assert got == [queued]
    assert queued.cancelled()

"""Hostile input: malformed wire headers, jobs and results that cannot travel, misuse of shutdown.

Each case has one clear, documented outcome and no future hangs (every wait has a deadline).
"""
from __future__ import annotations

import concurrent.futures as cf
import pickle
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jobs
from hardutil import JOB_DEADLINE, SHUTDOWN_DEADLINE, call_with_deadline, error_text, pid_alive, wait_for

MiB = 1 << 20

_FUZZ = settings(max_examples=5_000, deadline=None, database=None, derandomize=True,
                 suppress_health_check=list(HealthCheck))


# --- the header decoder -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wire(shmpool_mod):
    import shmpool.wire as wire

    return wire


def _check_decode(wire, data: bytes):
    """decode() either raises WireError or returns a header that re-encodes to exactly `data`."""
    try:
        h = wire.decode(data)
    except wire.WireError:
        return False
    # Anything else propagates and fails the test: "never another exception".
    assert type(h) is wire.Header
    assert isinstance(h.kind, wire.MsgKind)
    assert wire.encode(h.kind, h.job_id, h.offset, h.length, h.flags) == data
    assert 0 <= h.job_id < 2**64 and 0 <= h.offset and 0 <= h.length and h.offset + h.length < 2**64
    return True


def test_wire_contract(wire):
    assert wire.HEADER.size == 32 and wire.HEADER.format in ("<4sBBHQQQ", b"<4sBBHQQQ")
    assert issubclass(wire.WireError, ValueError)
    for kind in wire.MsgKind:
        data = wire.encode(kind, 2**64 - 1, 5, 7, 0)
        assert len(data) == 32 and data[:4] == b"SHMP"
        assert wire.decode(data) == (kind, 2**64 - 1, 5, 7, 0)


@_FUZZ
@given(st.binary(min_size=0, max_size=80))
def test_fuzz_decode_random_bytes(wire, data):
    """5,000 random byte strings of random length: WireError or a valid header, never anything else."""
    _check_decode(wire, data)


_FIELDS = ("magic", "version", "kind", "flags", "job_id", "offset", "length")
_WIDTH = {"magic": None, "version": 8, "kind": 8, "flags": 16, "job_id": 64, "offset": 64, "length": 64}


@st.composite
def _mutated_headers(draw, wire):
    kind = draw(st.sampled_from(list(wire.MsgKind)))
    job_id = draw(st.integers(0, 2**64 - 1))
    offset = draw(st.integers(0, 2**63 - 1))
    length = draw(st.integers(0, 2**63 - 1))
    valid = wire.encode(kind, job_id, offset, length, 0)
    fields = list(wire.HEADER.unpack(valid))
    how = draw(st.sampled_from(_FIELDS + ("truncate", "extend", "flip_byte")))
    if how == "truncate":
        return valid[: draw(st.integers(0, 31))]
    if how == "extend":
        return valid + draw(st.binary(min_size=1, max_size=16))
    if how == "flip_byte":
        i = draw(st.integers(0, 31))
        return valid[:i] + bytes([valid[i] ^ draw(st.integers(1, 255))]) + valid[i + 1:]
    i = _FIELDS.index(how)
    if how == "magic":
        fields[i] = draw(st.binary(min_size=4, max_size=4))
    else:
        bits = _WIDTH[how]
        edge = st.sampled_from([0, 1, 2**bits - 1, 2**(bits - 1), fields[i] + 1 if fields[i] + 1 < 2**bits else 0])
        fields[i] = draw(st.one_of(edge, st.integers(0, 2**bits - 1)))
    return wire.HEADER.pack(*fields)


def test_fuzz_decode_mutated_headers(wire):
    """5,000 valid headers with one field (or byte, or the length) mutated: WireError or valid."""
    seen = {"accepted": 0, "rejected": 0}

    @_FUZZ
    @given(_mutated_headers(wire))
    def run(data):
        seen["accepted" if _check_decode(wire, data) else "rejected"] += 1

    run()
    assert seen["accepted"] > 0 and seen["rejected"] > 0, seen  # both branches were exercised


def test_decode_rejects_non_bytes_cleanly(wire):
    """Inputs of the wrong type are a caller bug, but decode must still not crash the reader oddly on
    byte-like objects: memoryview/bytearray of a valid header decode; of junk raise WireError."""
    valid = wire.encode(wire.MsgKind.JOB, 1, 2, 3)
    assert wire.decode(bytearray(valid)).job_id == 1
    assert wire.decode(memoryview(valid)).length == 3
    for junk in (bytearray(b"\0" * 32), memoryview(b"SHMP" + b"\xff" * 28), b""):
        with pytest.raises(wire.WireError):
            wire.decode(junk)


# --- jobs and results that cannot travel ---------------------------------------------------------------
def _pool_still_works(pool):
    futs = [pool.submit(jobs.add, i, 1) for i in range(4)]
    assert [f.result(timeout=JOB_DEADLINE) for f in futs] == [1, 2, 3, 4]


@pytest.mark.parametrize("case", ["lambda", "lock_argument", "local_class"])
def test_unpicklable_job_raises_from_submit(make_pool, kind, case):
    """The default pickler cannot pickle a lambda, a lock, or a local class: submit raises at once
    (pickle.PicklingError / TypeError / AttributeError), and the pool is unaffected."""
    pool = make_pool(1, kind=kind)

    class Local:
        pass

    fn, args = {"lambda": (lambda: 1, ()), "lock_argument": (jobs.identity, (threading.Lock(),)),
                "local_class": (jobs.identity, (Local(),))}[case]
    t0 = time.monotonic()
    with pytest.raises((pickle.PicklingError, TypeError, AttributeError)) as ei:
        pool.submit(fn, *args)
    assert time.monotonic() - t0 < 5, "submit must fail at once, not after a round trip"
    assert type(ei.value) in (pickle.PicklingError, TypeError, AttributeError)
    _pool_still_works(pool)


def test_cloudpickler_takes_a_lambda(shmpool_mod, make_pool, kind):
    pool = make_pool(1, kind=kind, pickler=shmpool_mod.CloudPickler())
    assert pool.submit(lambda x: x * 3, 14).result(timeout=JOB_DEADLINE) == 42


@pytest.mark.parametrize("case", ["setstate_raises", "reduce_raises", "module_missing_in_worker"])
def test_arguments_fail_to_unpickle_in_worker(shmpool_mod, make_pool, kind, tmp_path, case):
    """Arguments that pickle in the parent but fail to unpickle in the worker: SubprocException naming
    the error; the worker survives (no death) and the next job runs."""
    pool = make_pool(1, kind=kind)
    _pool_still_works(pool)
    (pid_before,) = pool.worker_pids()
    if case == "setstate_raises":
        fut, name = pool.submit(jobs.identity, jobs.BadSetstate()), "JobBoom"
    elif case == "reduce_raises":
        fut, name = pool.submit(jobs.identity, jobs.FailOnUnpickle("raise", None)), "JobBoom"
    else:
        # A module that only the parent can import (added to sys.path after the workers started).
        moddir = tmp_path / "only_in_parent"
        moddir.mkdir()
        (moddir / "parent_only_mod_xyz.py").write_text("class Thing:\n    pass\n")
        sys.path.insert(0, str(moddir))
        try:
            import parent_only_mod_xyz

            fut, name = pool.submit(jobs.identity, parent_only_mod_xyz.Thing()), "ModuleNotFoundError"
        finally:
            sys.path.remove(str(moddir))
            sys.modules.pop("parent_only_mod_xyz", None)
    exc = fut.exception(timeout=JOB_DEADLINE)
    assert type(exc) is shmpool_mod.errors.remote_error_type(), error_text(exc) if exc else fut.result(timeout=0)
    assert f"Name={name}" in str(exc) or name in exc.details, str(exc)
    _pool_still_works(pool)
    assert pool.worker_pids() == [pid_before]
    assert pool.stats().workers_died == 0


def test_unpicklable_result(shmpool_mod, make_pool, kind):
    """A job returning a lock: SubprocException whose details say the result could not be pickled."""
    pool = make_pool(1, kind=kind)
    exc = pool.submit(jobs.return_lock).exception(timeout=JOB_DEADLINE)
    assert type(exc) is shmpool_mod.errors.remote_error_type(), error_text(exc) if exc else None
    assert "TypeError" in exc.details and "pickle" in exc.details.lower(), exc.details
    _pool_still_works(pool)
    assert pool.stats().workers_died == 0


def test_result_over_max_payload(shmpool_mod, make_pool, kind):
    """A result over max_payload fails its future with SubprocException naming both sizes (contract)."""
    cap = 1 * MiB
    pool = make_pool(1, kind=kind, max_payload=cap)
    assert pool.submit(jobs.make_bytes, cap // 2).result(timeout=JOB_DEADLINE) == b"\x5a" * (cap // 2)
    exc = pool.submit(jobs.make_bytes, 2 * cap).exception(timeout=JOB_DEADLINE)
    assert type(exc) is shmpool_mod.errors.remote_error_type(), error_text(exc) if exc else None
    text = str(exc).replace(",", "")
    assert "PayloadTooLargeError" in text and str(cap) in text, text
    assert any(str(n) in text for n in range(2 * cap, 2 * cap + 200)), f"result size not named: {text}"
    _pool_still_works(pool)


def test_job_over_max_payload_raises_from_submit(shmpool_mod, make_pool, kind):
    cap = 1 * MiB
    pool = make_pool(1, kind=kind, max_payload=cap)
    with pytest.raises(shmpool_mod.PayloadTooLargeError) as ei:
        pool.submit(jobs.identity, b"x" * (2 * cap))
    assert type(ei.value) is shmpool_mod.PayloadTooLargeError and isinstance(ei.value, ValueError)
    assert ei.value.cap == cap and ei.value.size > 2 * cap, (ei.value.size, ei.value.cap)
    assert str(cap) in str(ei.value).replace(",", "")
    _pool_still_works(pool)


def test_submit_after_shutdown(make_pool, kind):
    pool = make_pool(1, kind=kind)
    _pool_still_works(pool)
    make_pool.note(pool)
    call_with_deadline(pool.shutdown, SHUTDOWN_DEADLINE, "shutdown()")
    call_with_deadline(pool.shutdown, SHUTDOWN_DEADLINE, "second shutdown() (idempotent)")
    for submit in (lambda: pool.submit(jobs.add, 1, 2), lambda: pool.submit_job(jobs.add, (1, 2))):
        with pytest.raises(RuntimeError) as ei:
            submit()
        assert type(ei.value) is RuntimeError, type(ei.value)


def test_shutdown_pending_futures_fail_with_runtime_error(make_pool, kind):
    """Contract: shutdown() makes pending futures fail with RuntimeError; none is left hanging."""
    pool = make_pool(1, kind=kind)
    _pool_still_works(pool)
    make_pool.note(pool)
    futs = [pool.submit(jobs.sleep_return, 0.3, i) for i in range(6)]
    time.sleep(0.1)
    call_with_deadline(pool.shutdown, SHUTDOWN_DEADLINE, "shutdown() with jobs queued")
    outcomes = _settle(futs)
    assert any(o == "RuntimeError" for o in outcomes), outcomes  # the queued tail was failed, not run


def _settle(futs):
    """Each future's outcome ('ok' with the right value, or the exception type name); none may hang."""
    done, not_done = cf.wait(futs, timeout=SHUTDOWN_DEADLINE)
    assert not not_done, f"{len(not_done)} futures still pending {SHUTDOWN_DEADLINE}s after shutdown"
    outcomes = []
    for i, f in enumerate(futs):
        exc = f.exception(timeout=0)
        if exc is None:
            assert f.result(timeout=0) == i
            outcomes.append("ok")
        else:
            assert type(exc) is RuntimeError, error_text(exc)
            outcomes.append("RuntimeError")
    return outcomes


def test_shutdown_from_done_callback(make_pool, kind):
    """pool.shutdown() called from a done-callback (which runs on the pool's own thread) must neither
    deadlock nor raise; later futures settle; the processes go."""
    pool = make_pool(2, kind=kind)
    _pool_still_works(pool)
    make_pool.note(pool)
    called = threading.Event()
    errors = []

    def callback(f):
        try:
            pool.shutdown()
        except BaseException as e:  # recorded and asserted below
            errors.append(e)
        finally:
            called.set()

    first = pool.submit(jobs.sleep_return, 0.3, "first")
    later = [pool.submit(jobs.sleep_return, 0.3, i) for i in range(6)]
    first.add_done_callback(callback)
    assert called.wait(SHUTDOWN_DEADLINE), "the done-callback never finished: shutdown() deadlocked in it"
    assert errors == [], [error_text(e) for e in errors]
    assert first.result(timeout=0) == "first"
    _settle(later)
    with pytest.raises(RuntimeError):
        pool.submit(jobs.add, 1, 1)
    wait_for(lambda: not any(pid_alive(p) for p in make_pool.pids), SHUTDOWN_DEADLINE, "workers to exit")


def test_shutdown_from_another_thread_while_jobs_run(make_pool, kind):
    pool = make_pool(2, kind=kind)
    _pool_still_works(pool)
    make_pool.note(pool)
    futs = [pool.submit(jobs.sleep_return, 0.2, i) for i in range(20)]
    stop = threading.Event()
    submitted_after = []

    def keep_submitting():
        # A third thread keeps submitting across the shutdown: each submit either works or raises
        # RuntimeError, and nothing it got back may hang.
        i = 100
        while not stop.is_set():
            try:
                submitted_after.append((i, pool.submit(jobs.identity, i)))
            except RuntimeError:
                return
            i += 1
            time.sleep(0.005)

    t = threading.Thread(target=keep_submitting, daemon=True)
    t.start()
    time.sleep(0.3)
    shutter = threading.Thread(target=pool.shutdown, daemon=True)
    shutter.start()
    shutter.join(SHUTDOWN_DEADLINE)
    assert not shutter.is_alive(), "shutdown() from another thread did not return"
    stop.set()
    t.join(SHUTDOWN_DEADLINE)
    assert not t.is_alive()
    _settle(futs)
    done, not_done = cf.wait([f for _, f in submitted_after], timeout=SHUTDOWN_DEADLINE)
    assert not not_done, f"{len(not_done)} futures submitted around shutdown() hang"
    for i, f in submitted_after:
        exc = f.exception(timeout=0)
        assert exc is None and f.result(timeout=0) == i or type(exc) is RuntimeError, error_text(exc) if exc else f.result(timeout=0)
    wait_for(lambda: not any(pid_alive(p) for p in make_pool.pids), SHUTDOWN_DEADLINE, "workers to exit")

"""Randomized torture test for issue 9: everything at once, bounded in time, seeded.

8 submitter threads send payloads of 0 B to 2x the ring (1 MiB ring: some travel in the ring, some in
one-off segments) as bytes, bytearray and numpy arrays (half of the mutable ones overwritten right after submit() returns:
the job must see the submit-time bytes), and ask for results of the same range of sizes;
some threads cancel() some of their futures at once, others abandon theirs (never wait on them); a
separate thread SIGKILLs a random worker now and then (pool.worker_pids()).  Every future must resolve
by the deadline; a job that died with its worker fails with WorkerDiedError (the one acceptable failure);
every other job returns exactly the right bytes (digest checked on both sides).  At the end the pool
still serves a job, and after shutdown() no worker is alive and nothing of ours is in /dev/shm (the
make_pool fixture).

The seed comes from $SHMPOOL_TORTURE_SEED (default: random) and is in every failure message; rerun with
it to replay the same choices (the timing, and so which jobs a kill hits, still varies).
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import random
import signal
import threading
import time

import numpy as np
import pytest

import jobs
from hardutil import JOB_DEADLINE, assert_all_resolve, error_text, result_within

MiB = 1 << 20
RING = 1 << 20
SUBMIT_SECONDS = 8.0  # per start kind: the submit phase; draining and checks come on top (~20-40 s in all)
THREADS = 8
MAX_OUTSTANDING = 6  # per thread: bounds memory (6 x 8 x 2 MiB each way)
DRAIN_DEADLINE = 40.0  # every future resolves within this once the submitting stops
THREAD_WAIT = 30.0  # a submitter waits this long at most for its oldest future
KILL_EVERY = (0.3, 0.9)  # seconds between SIGKILLs of a random worker


def _size(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.1:
        return 0
    if r < 0.45:
        return rng.randint(1, 4096)
    if r < 0.75:
        return rng.randint(4097, RING // 2)
    return rng.randint(RING // 2, 2 * RING)


def _payload(rng: random.Random, seed: int):
    n = _size(rng)
    raw = jobs.pattern(n, seed)
    form = rng.choice(("bytes", "bytearray", "ndarray"))
    if form == "bytearray":
        return bytearray(raw), n
    if form == "ndarray":
        return np.frombuffer(raw, dtype=np.uint8).copy(), n
    return raw, n


def _scribble(data) -> None:
    """Overwrite a mutable payload in place (bytes are immutable and left alone)."""
    if isinstance(data, np.ndarray):
        data[:] = 0xEE
    elif isinstance(data, bytearray):
        data[:] = b"\xee" * len(data)


@pytest.mark.timeout(150)
def test_torture(shmpool_mod, make_pool, kind):
    sp = shmpool_mod
    seed = int(os.environ.get("SHMPOOL_TORTURE_SEED") or random.randrange(1 << 32))
    tag = f"[torture seed={seed} kind={kind.value}; rerun with SHMPOOL_TORTURE_SEED={seed}]"
    print(tag)
    pool = make_pool(2, kind=kind, ring_size=RING)
    result_within(pool.submit(jobs.getpid), JOB_DEADLINE, f"the first job {tag}")

    stop = threading.Event()
    lock = threading.Lock()
    records: list[tuple] = []  # (future, index, expected out digest, expected out size, cancelled by us)
    kills: list[int] = []
    thread_errors: list[str] = []

    def submitter(tid: int) -> None:
        rng = random.Random(seed * 1000 + tid)
        mode = ("wait", "cancel", "abandon")[tid % 3]
        mine: list = []
        i = 0
        try:
            while not stop.is_set():
                index = tid * 1_000_000 + i
                i += 1
                data, _ = _payload(rng, index)
                want_in = jobs.bytes_digest(data)
                out_size = _size(rng)
                out_seed = rng.randrange(1 << 32)
                want_out = jobs.bytes_digest(jobs.pattern(out_size, out_seed) if out_size else b"")
                seconds = rng.choice((0, 0, 0, 0.005, 0.02))
                fut = pool.submit(jobs.torture_job, index, data, want_in, out_size, out_seed, seconds)
                if rng.random() < 0.5:
                    _scribble(data)  # the job must still see the bytes of submit time
                cancelled = mode == "cancel" and rng.random() < 0.3 and fut.cancel()
                with lock:
                    records.append((fut, index, want_out, out_size, cancelled))
                if mode != "abandon":
                    mine.append(fut)
                    if len(mine) >= MAX_OUTSTANDING:
                        cf.wait(mine[:1], timeout=THREAD_WAIT)
                        if not mine[0].done():
                            thread_errors.append(f"thread {tid}: a future did not resolve within {THREAD_WAIT} s")
                            return
                        mine = [f for f in mine if not f.done()]
                else:
                    time.sleep(0.01)  # abandoned futures pile up: keep their number (and memory) moderate
        except Exception as e:  # reported below: a submit must never raise here
            thread_errors.append(f"thread {tid}: {type(e).__name__}: {e}")

    def killer() -> None:
        rng = random.Random(seed ^ 0x5A5A)
        while not stop.wait(rng.uniform(*KILL_EVERY)):
            pids = pool.worker_pids()
            if pids:
                pid = rng.choice(pids)
                try:
                    os.kill(pid, signal.SIGKILL)
                    kills.append(pid)
                except ProcessLookupError:
                    pass
                make_pool.pids.add(pid)

    threads = [threading.Thread(target=submitter, args=(t,), name=f"torture-{t}", daemon=True) for t in range(THREADS)]
    threads.append(threading.Thread(target=killer, name="torture-killer", daemon=True))
    for t in threads:
        t.start()
    time.sleep(SUBMIT_SECONDS)
    stop.set()
    end = time.monotonic() + DRAIN_DEADLINE
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, f"{tag} threads still running {DRAIN_DEADLINE} s after the stop (a wait hung): {stuck}"
    assert not thread_errors, f"{tag} {thread_errors[:5]}"
    end = time.monotonic() + DRAIN_DEADLINE

    futures = [r[0] for r in records]
    try:
        outcomes = assert_all_resolve(futures, DRAIN_DEADLINE, "torture job")
    except AssertionError as e:
        raise AssertionError(f"{tag} {e}") from None

    ok = died = cancelled = 0
    wrong = []
    for (fut, index, want_out, out_size, we_cancelled), (what, value) in zip(records, outcomes):
        if what == "cancelled":
            if not we_cancelled:
                wrong.append((index, "cancelled, though nobody cancelled it"))
            cancelled += 1
        elif what == "error":
            if type(value) is sp.WorkerDiedError:
                died += 1
            else:
                wrong.append((index, error_text(value).strip().splitlines()[-1][:300]))
        else:
            got_index, got_digest, out = value
            out_digest = jobs.bytes_digest(out)
            if got_index != index or got_digest != want_out or out_digest != want_out or len(out) != out_size:
                wrong.append((index, f"wrong result: index {got_index}, {len(out)} of {out_size} bytes"))
            else:
                ok += 1
    summary = f"{len(records)} jobs: {ok} ok, {died} died with their worker, {cancelled} cancelled, {len(kills)} kills"
    print(summary)
    assert not wrong, f"{tag} {summary}; {len(wrong)} with a wrong outcome, e.g. {wrong[:5]}"
    assert kills, f"the killer never found a worker to kill {tag}"
    assert ok >= len(records) // 2, f"too few jobs succeeded: {summary} {tag}"

    make_pool.note(pool)
    assert result_within(pool.submit(jobs.add, 20, 22), JOB_DEADLINE, f"a job after the torture {tag}") == 42
    make_pool.note(pool)

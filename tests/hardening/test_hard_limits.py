"""Per-job timeout, the worker memory cap, running out of shared memory, and a full /dev/shm."""
from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

import jobs
from hardutil import JOB_DEADLINE, RECOVERY_DEADLINE, error_text, pid_alive, read_pid, wait_for, warm

MiB = 1 << 20


@pytest.mark.parametrize("how", ["submit_job", "pool_default"])
def test_per_job_timeout_kills_and_replaces_worker(shmpool_mod, make_pool, kind, tmp_path, how):
    """A job sleeping past its timeout (0.5 s) fails with JobTimeoutError (a TimeoutError) no sooner
    than the timeout and well before the job would end; its worker is killed and replaced (new pid);
    a job on the other worker is untouched; the next job works."""
    sp = shmpool_mod
    assert issubclass(sp.JobTimeoutError, TimeoutError)
    if how == "pool_default":
        pool = make_pool(2, kind=kind, job_timeout=0.5)
    else:
        pool = make_pool(2, kind=kind)
    assert len(warm(pool, 2)) == 2
    make_pool.note(pool)
    other_pf = tmp_path / "other.pid"
    other = pool.submit_job(jobs.note_pid_and_sleep, (str(other_pf), 0.3, "other"), timeout=20)
    read_pid(other_pf)
    pidfile = tmp_path / "slow.pid"
    t0 = time.monotonic()
    if how == "pool_default":
        fut = pool.submit(jobs.note_pid_and_sleep, str(pidfile), 30, "never")
    else:
        fut = pool.submit_job(jobs.note_pid_and_sleep, (str(pidfile), 30, "never"), timeout=0.5)
    exc = fut.exception(timeout=JOB_DEADLINE)
    elapsed = time.monotonic() - t0
    assert type(exc) is sp.JobTimeoutError, error_text(exc) if exc else fut.result(timeout=0)
    assert 0.45 <= elapsed < 10, elapsed
    victim = read_pid(pidfile)
    assert other.result(timeout=JOB_DEADLINE) == "other"
    wait_for(lambda: not pid_alive(victim), RECOVERY_DEADLINE, f"timed-out worker {victim} to be killed")
    if how == "pool_default":
        # The pool-wide default applies to every job: quick ones still pass.
        assert pool.submit(jobs.sleep_return, 0.05, "quick").result(timeout=JOB_DEADLINE) == "quick"
    else:
        assert pool.submit(jobs.sleep_return, 1.0, "slow-ok").result(timeout=JOB_DEADLINE) == "slow-ok"
    pids = [f.result(timeout=JOB_DEADLINE) for f in [pool.submit(jobs.getpid) for _ in range(6)]]
    assert victim not in pids
    wait_for(lambda: len(pool.worker_pids()) == 2 and victim not in pool.worker_pids(), RECOVERY_DEADLINE,
             "a replacement worker")
    make_pool.note(pool)


def test_timeout_does_not_fire_for_jobs_that_finish(make_pool, kind):
    """Jobs well inside their timeout complete, and the worker is not replaced."""
    pool = make_pool(1, kind=kind)
    pid = pool.submit(jobs.getpid).result(timeout=JOB_DEADLINE)
    futs = [pool.submit_job(jobs.sleep_return, (0.05, i), timeout=5) for i in range(5)]
    assert [f.result(timeout=JOB_DEADLINE) for f in futs] == list(range(5))
    assert pool.submit_job(jobs.getpid, timeout=5).result(timeout=JOB_DEADLINE) == pid
    assert pool.stats().workers_died == 0


def test_memory_cap_recycles_worker_between_jobs(shmpool_mod, make_pool, kind):
    """A job that allocates (and keeps) 300 MiB in a worker capped at 200 MiB RSS: its result is still
    delivered, then the worker is recycled: the next job runs in a new pid. A job under the cap does not
    recycle (the pid stays)."""
    cap = 200 * MiB
    pool = make_pool(1, kind=kind, worker_memory_cap=cap)
    first = pool.submit(jobs.getpid).result(timeout=JOB_DEADLINE)
    assert pool.submit(jobs.hoard, 10 * MiB).result(timeout=JOB_DEADLINE) == first  # under the cap
    assert pool.submit(jobs.getpid).result(timeout=JOB_DEADLINE) == first
    make_pool.note(pool)
    assert pool.submit(jobs.hoard, 300 * MiB).result(timeout=JOB_DEADLINE) == first  # over: still delivered
    second = pool.submit(jobs.getpid).result(timeout=JOB_DEADLINE)
    assert second != first
    wait_for(lambda: not pid_alive(first), RECOVERY_DEADLINE, "the over-cap worker to exit")
    assert pool.submit(jobs.getpid).result(timeout=JOB_DEADLINE) == second
    make_pool.note(pool)
    st = pool.stats()
    assert st.jobs_failed == 0, st


# --- shared memory runs out -----------------------------------------------------------------------------
# A one-off segment is a memfd reserved in full (posix_fallocate) before it is written, so running out
# of memory should be a clear error at that point, not a SIGBUS later.  Exhausting the machine's memory
# in a test is not safe, so RLIMIT_FSIZE stands in for it: memfd ftruncate/fallocate past the limit fail
# with EFBIG (SIGXFSZ ignored), exactly where ENOSPC/ENOMEM would surface on a full tmpfs.


@contextlib.contextmanager
def _file_size_limit(nbytes):
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, old_handler)


def test_parent_out_of_shared_memory_fails_the_job_clearly(make_pool, kind):
    """The parent cannot get a one-off segment for a 100 MiB job: that job fails at once with a
    MemoryError (shm.SharedMemoryError) naming the size; no worker is started or abandoned over it (the
    pool stays at nprocs workers); once memory is back, jobs run."""
    pool = make_pool(1, kind=kind, ring_size=8 * MiB)
    (pid,) = warm(pool, 1)
    peak_workers = 0
    with _file_size_limit(64 * MiB):
        fut = pool.submit(jobs.len_and_sleep, b"x" * (100 * MiB), 0)
        end = time.monotonic() + 10
        while not fut.done() and time.monotonic() < end:
            peak_workers = max(peak_workers, len(pool.worker_pids()))
            time.sleep(0.05)
        done = fut.done()
    assert done, f"the job neither ran nor failed in 10 s; the pool grew to {peak_workers} workers meanwhile"
    exc = fut.exception(timeout=0)
    assert isinstance(exc, MemoryError), error_text(exc) if exc else fut.result(timeout=0)
    assert re.search(r"1048(57|58)\d\d\d", str(exc).replace(",", "")), f"size not named: {exc}"
    assert peak_workers <= 1 and pool.worker_pids() == [pid], (peak_workers, pool.worker_pids())
    assert pool.submit(jobs.len_and_sleep, b"x" * (100 * MiB), 0).result(timeout=JOB_DEADLINE) == 100 * MiB
    make_pool.note(pool)


def test_worker_out_of_shared_memory_fails_the_job_clearly(shmpool_mod, make_pool, kind):
    """A worker cannot get a one-off segment for its 100 MiB result: the job fails with a
    SubprocException naming SharedMemoryError (the cause), the worker survives, the next job runs."""
    pool = make_pool(1, kind=kind, ring_size=8 * MiB, initializer=jobs.limit_file_size, initargs=(64 * MiB,))
    (pid,) = warm(pool, 1)
    exc = pool.submit(jobs.make_bytes, 100 * MiB).exception(timeout=JOB_DEADLINE)
    assert type(exc) is shmpool_mod.errors.remote_error_type(), error_text(exc) if exc else "succeeded"
    assert "SharedMemoryError" in str(exc), str(exc)
    assert pool.submit(jobs.getpid).result(timeout=JOB_DEADLINE) == pid
    assert pool.stats().workers_died == 0


# Run inside a private mount namespace whose /dev/shm is a full 8 KiB tmpfs: the machine's own
# /dev/shm is never touched. The script prints one line per outcome.
_DEV_SHM_FULL_SCRIPT = r"""
import operator, os, sys, time
from shmpool import SubprocKind, SubprocPool
pool = SubprocPool(2, kind=SubprocKind(sys.argv[1]))
print("with /dev/shm full:", pool.submit(operator.add, 1, 2).result(timeout=float(sys.argv[2])))
print("entries:", sorted(os.listdir("/dev/shm")))
pool.shutdown()
"""


def _can_unshare_mounts() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.parametrize("kind_value", ["spawn", "fork"])
def test_a_full_dev_shm_does_not_stop_workers_starting(kind_value):
    """/dev/shm full when workers start: they start and run the job, and /dev/shm gains nothing.
    (With named semaphores, two one-page files per starting worker, every start failed there and
    the queued jobs failed with WorkerStartError.)"""
    if not _can_unshare_mounts():
        pytest.skip("needs root and `unshare --mount` to give the test a private, full /dev/shm")
    shell = (
        "mount -t tmpfs -o size=8k tmpfs /dev/shm && "
        "dd if=/dev/zero of=/dev/shm/fill bs=4k count=2 2>/dev/null; "
        f'exec "{sys.executable}" -c "$0" "$1" "$2"'
    )
    proc = subprocess.run(
        ["unshare", "--mount", "bash", "-c", shell, _DEV_SHM_FULL_SCRIPT, kind_value, str(JOB_DEADLINE)],
        capture_output=True, text=True, timeout=3 * JOB_DEADLINE,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines() == ["with /dev/shm full: 3", "entries: ['fill']"], proc.stdout

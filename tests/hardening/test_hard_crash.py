"""Crash matrix: every failure x every phase of a job's life, under both start kinds.

One parametrized table (STYLE habit 9, after loky's test_reusable_executor crash table). Each cell
runs a 2-worker pool with a second job in flight on the other worker, injects the failure, and checks:

* the job's future fails with the documented type and fields (or, for the parent-read deaths, that
  the already-delivered result still arrives);
* the other job in flight completes;
* the next jobs succeed, on a full complement of workers;
* the stats count it; and after shutdown() no process or /dev/shm entry of ours is left (make_pool).

The "parent reads the result" row: by then the worker has finished, so exit/segfault/SIGKILL cannot
happen *inside* the read.  The closest meaningful thing is tested instead: the result's unpickling in
the parent kills the worker that produced it (exit(1) through a SIGUSR1 handler the job installed,
SIGSEGV, SIGKILL) while the parent is still reading.  Expected: the result is delivered anyway (a death
after the answer fails no job), the death is counted, and the worker is replaced.  "raise" in that
row makes the parent's own unpickling fail: the future must fail with that error (JobBoom itself, or
a SubprocException carrying it), not hang, and the pool must keep working.
"""
from __future__ import annotations

import re
import signal

import pytest

import jobs
from hardutil import JOB_DEADLINE, RECOVERY_DEADLINE, error_text, pid_alive, read_pid, wait_for, warm

PHASES = ("unpickle_args", "run", "pickle_result", "parent_reads_result")

# expected outcome per (failure, phase):
#   ("remote", text)        SubprocException, Name=JobBoom, `text` in the traceback details
#   ("died", exitcode, word) WorkerDiedError(pid=job's pid, exitcode), `word` and the pid in the message
#   ("parent_error", text)  the parent's unpickling error reaches the future (JobBoom or SubprocException)
#   ("delivered", None)     the result arrives; the worker's later death is counted and it is replaced
_DEATHS = {"exit": (1, "exit code 1"), "segfault": (-signal.SIGSEGV, "SIGSEGV"), "sigkill": (-signal.SIGKILL, "SIGKILL")}
CRASH_TABLE = []
for _phase, _where in [("unpickle_args", "unpickling the arguments"), ("run", "running the job"),
                       ("pickle_result", "pickling the result")]:
    CRASH_TABLE.append(("raise", _phase, ("remote", f"boom while {_where}")))
    for _failure, (_code, _word) in _DEATHS.items():
        CRASH_TABLE.append((_failure, _phase, ("died", _code, _word)))
CRASH_TABLE.append(("raise", "parent_reads_result", ("parent_error", "boom while unpickling the result in the parent")))
for _failure in _DEATHS:
    CRASH_TABLE.append((_failure, "parent_reads_result", ("delivered", None)))
assert len(CRASH_TABLE) == len(jobs.FAILURES) * len(PHASES)

CRASH_PARAMS = [
    pytest.param(f, p, e, id=f"{f}-{p}")
    for f, p, e in CRASH_TABLE
]


def _submit_crashing(pool, failure, phase, pidfile):
    if phase == "unpickle_args":
        return pool.submit(jobs.run_and_fail, "raise", None, jobs.FailOnUnpickle(failure, pidfile))
    if phase == "run":
        return pool.submit(jobs.run_and_fail, failure, pidfile)
    if phase == "pickle_result":
        return pool.submit(jobs.return_fail_on_pickle, failure, pidfile)
    if phase == "parent_reads_result":
        return pool.submit(jobs.return_fail_in_parent, failure, pidfile, ("delivered", failure))
    raise AssertionError(phase)


@pytest.mark.parametrize("failure,phase,expected", CRASH_PARAMS)
def test_crash_matrix(shmpool_mod, make_pool, kind, tmp_path, failure, phase, expected):
    sp = shmpool_mod
    pool = make_pool(2, kind=kind)
    # Both workers up before the experiment, so "the other worker" exists.
    assert len(warm(pool, 2)) == 2
    make_pool.note(pool)

    other_pidfile = tmp_path / "other.pid"
    other = pool.submit(jobs.note_pid_and_sleep, str(other_pidfile), 1.0, "other-ok")
    other_pid = read_pid(other_pidfile)

    pidfile = tmp_path / "crash.pid"
    fut = _submit_crashing(pool, failure, phase, str(pidfile))
    outcome = expected[0]

    if outcome == "delivered":
        assert fut.result(timeout=JOB_DEADLINE) == ("delivered", failure)
        victim = read_pid(pidfile)
        wait_for(lambda: not pid_alive(victim), RECOVERY_DEADLINE, f"worker {victim} to die after delivering")
    else:
        exc = fut.exception(timeout=JOB_DEADLINE)
        assert exc is not None, f"{failure} while {phase}: the future succeeded with {fut.result(timeout=0)!r}"
        victim = read_pid(pidfile)
        if outcome == "remote":
            assert type(exc) is sp.errors.remote_error_type(), error_text(exc)
            msg = str(exc)
            assert msg.startswith("An exception occurred in a subprocess:"), msg
            assert re.search(r"Name=\S*JobBoom\b", msg), msg
            assert "Traceback" in exc.details and expected[1] in exc.details, exc.details
        elif outcome == "died":
            code, word = expected[1], expected[2]
            assert type(exc) is sp.WorkerDiedError, error_text(exc)
            assert (exc.pid, exc.exitcode) == (victim, code), str(exc)
            assert str(victim) in str(exc) and word in str(exc), str(exc)
            assert victim != other_pid  # the other job held the other worker
        elif outcome == "parent_error":
            assert type(exc) in (jobs.JobBoom, sp.errors.remote_error_type()), error_text(exc)
            assert expected[1] in error_text(exc), error_text(exc)
        else:
            raise AssertionError(outcome)

    # The other worker's job is untouched.
    assert other.result(timeout=JOB_DEADLINE) == "other-ok"

    # The pool goes on: the next jobs succeed, on a full set of live workers none of which is the victim.
    for round_ in range(2):
        futs = [pool.submit(jobs.add, i, 100) for i in range(6)]
        assert [f.result(timeout=JOB_DEADLINE) for f in futs] == [i + 100 for i in range(6)]
    if outcome in ("died", "delivered"):
        wait_for(lambda: len(pool.worker_pids()) == 2 and victim not in pool.worker_pids(), RECOVERY_DEADLINE,
                 "the pool to be back to 2 workers without the victim")
    else:  # a raise, on either side, costs no worker
        assert victim in pool.worker_pids() and len(pool.worker_pids()) == 2, (victim, pool.worker_pids())
    make_pool.note(pool)
    assert all(pid_alive(p) for p in pool.worker_pids())

    st = pool.stats()
    assert type(st) is sp.PoolStats
    died = outcome in ("died", "delivered")
    failed = outcome != "delivered"
    wait_for(lambda: pool.stats().workers_died == int(died), RECOVERY_DEADLINE, f"stats().workers_died == {int(died)}")
    assert pool.stats().jobs_failed == int(failed), pool.stats()

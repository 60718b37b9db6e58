"""Helpers and deadlines for the shmpool hardening tests (issue 5); fixtures are in conftest.py.

A module of its own, not conftest: ``tests/conftest.py`` is also imported as ``conftest``.

Everything here is test-only and stays out of the package (STYLE habit 9).  The job functions the
workers run live in ``jobs.py`` next to this file; SPAWN workers are fresh interpreters, so this file puts
the folder on ``PYTHONPATH`` before any pool starts, letting them import ``jobs`` by name.

Every wait in these tests has a deadline: the named constants below, each with its reason.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent

# SPAWN workers (and a spawned FORK helper) must find `jobs` by name.
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
_pp = os.environ.get("PYTHONPATH", "")
if str(HERE) not in _pp.split(os.pathsep):
    os.environ["PYTHONPATH"] = str(HERE) + (os.pathsep + _pp if _pp else "")

# --- deadlines (seconds) ------------------------------------------------------------------------------
# A normal job, including a fresh SPAWN worker start on a loaded 2-core machine (~0.3-1 s each).
JOB_DEADLINE = 30.0
# A dead process is noticed, reaped and replaced; generous because the machine has only 2 cores.
RECOVERY_DEADLINE = 15.0
# shutdown() must be bounded (STYLE habit 7); this is the bound the tests hold it to.
SHUTDOWN_DEADLINE = 20.0
# After the pool's parent is SIGKILLed, its workers/helpers must notice and exit "within a few seconds".
ORPHAN_DEADLINE = 5.0
# pytest-timeout backstop for a test that hangs despite the per-wait deadlines above.
TEST_BACKSTOP = 240

KIND_VALUES = ("spawn", "fork")

# Names of ours in /dev/shm (CONTRACT.md): `/shmp.<parentpid>.<random>...` -> `sem.shmp.<pid>.*` or `shmp.<pid>.*`
_OURS = re.compile(r"^(?:sem\.)?shmp\.(\d+)\.")


# --- small helpers ------------------------------------------------------------------------------------
def wait_for(predicate, timeout: float, what: str, interval: float = 0.02):
    """Poll `predicate` until truthy or `timeout` seconds pass; return its value or fail naming `what`."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= end:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """True if `pid` runs and is not a zombie (orphans reparented to a non-reaping init stay zombies)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def shm_entries_of(pids) -> set[str]:
    """Our /dev/shm entries (`shmp.<pid>.*`, `sem.shmp.<pid>.*`) whose pid field is one of `pids`."""
    pids = {int(p) for p in pids}
    found = set()
    for name in os.listdir("/dev/shm"):
        m = _OURS.match(name)
        if m and int(m.group(1)) in pids:
            found.add(name)
    return found


def all_shm_entries() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if _OURS.match(n)}


def read_pid(path: Path, timeout: float = JOB_DEADLINE) -> int:
    """Wait for a job to write its pid into `path` (jobs.note_pid) and return it."""
    wait_for(path.exists, timeout, f"a job to write its pid to {path.name}")
    return int(path.read_text())


def error_text(exc: BaseException) -> str:
    """Everything an error tells a user: message, remote details, and the cause chain."""
    parts = []
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        parts.append(f"{type(exc).__name__}: {exc}")
        details = getattr(exc, "details", None)
        if details:
            parts.append(str(details))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def warm(pool, nprocs: int, timeout: float = JOB_DEADLINE) -> set[int]:
    """Run short jobs until `nprocs` distinct worker pids have answered: every worker is started and
    READY (a pool may run early jobs on the first worker while a SPAWN sibling is still starting)."""
    import jobs

    pids: set[int] = set()
    end = time.monotonic() + timeout
    while len(pids) < nprocs:
        left = end - time.monotonic()
        if left <= 0:
            raise AssertionError(f"only {len(pids)} of {nprocs} workers answered within {timeout}s")
        futs = [pool.submit(jobs.sleep_return_pid, 0.05) for _ in range(2 * nprocs)]
        pids.update(f.result(timeout=max(left, 0.1)) for f in futs)
    return pids


def call_with_deadline(fn, timeout: float, what: str):
    """Run fn() in a daemon thread; fail (not hang) if it does not return within `timeout`."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # reported to the caller below
            box["error"] = e

    t = threading.Thread(target=run, name=f"deadline:{what}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise AssertionError(f"{what} did not return within {timeout:.1f}s (hang)")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def assert_all_resolve(futures, deadline_s: float, what: str = "future") -> list[tuple[str, object]]:
    """Wait at most `deadline_s` seconds in all for every future; return one outcome per future, in order:
    ("ok", result), ("error", exception) or ("cancelled", None).  Fails listing the ones still unresolved,
    so a hang reads "N of M futures did not resolve within D s", not as the pytest-timeout backstop.

    A future cancel()led while queued counts as resolved: concurrent.futures.wait() would not wake for it
    until the pool calls set_running_or_notify_cancel(), hence the short wait steps."""
    futures = list(futures)
    end = time.monotonic() + deadline_s
    while True:
        waiting = [f for f in futures if not f.done()]
        left = end - time.monotonic()
        if not waiting or left <= 0:
            break
        cf.wait(waiting, timeout=min(left, 0.25))
    unresolved = [i for i, f in enumerate(futures) if not f.done()]
    if unresolved:
        raise AssertionError(
            f"{len(unresolved)} of {len(futures)} {what}s did not resolve within {deadline_s:.1f} s "
            f"(indices {unresolved[:20]}{' ...' if len(unresolved) > 20 else ''})"
        )
    outcomes: list[tuple[str, object]] = []
    for f in futures:
        if f.cancelled():
            outcomes.append(("cancelled", None))
        elif f.exception(timeout=0) is not None:
            outcomes.append(("error", f.exception(timeout=0)))
        else:
            outcomes.append(("ok", f.result(timeout=0)))
    return outcomes


def result_within(future, deadline_s: float, what: str = "the job"):
    """`future.result()` bounded by `deadline_s`; a hang fails as "... did not resolve within N s"."""
    try:
        return future.result(timeout=deadline_s)
    except cf.TimeoutError:
        if future.done():
            raise  # the job itself failed with a TimeoutError subclass (JobTimeoutError)
        raise AssertionError(f"future of {what} did not resolve within {deadline_s:.1f} s (hang)") from None


def exception_within(future, deadline_s: float, what: str = "the job"):
    """`future.exception()` bounded by `deadline_s`: the exception, or None if it succeeded."""
    try:
        return future.exception(timeout=deadline_s)
    except cf.TimeoutError:
        raise AssertionError(f"future of {what} did not resolve within {deadline_s:.1f} s (hang)") from None


NOBODY = 65534  # uid and gid of "nobody"


def wait_child(pid: int, timeout: float) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"forked child {pid} did not exit within {timeout} s (hang); killed it")


def run_as_nobody(probe, timeout: float) -> dict:
    """Fork; in the child drop to uid/gid 65534 and run probe() -> dict; return that dict.  (A fork, not
    a script: this machine's python lives under /root, which 65534 cannot exec.)"""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery from here on, only os._exit
        code = 0
        try:
            os.close(r)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)  # not pytest-timeout's handler, inherited
            signal.alarm(int(timeout))
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            out = probe()
            out["uid"] = os.getuid()
        except BaseException as e:
            out = {"child_error": f"{type(e).__name__}: {e}"}
            code = 1
        os.write(w, json.dumps(out).encode())
        os._exit(code)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    wait_child(pid, timeout)
    return json.loads(b"".join(chunks) or b'{"child_error": "no report (killed?)"}')

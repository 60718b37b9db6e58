"""Job functions and payload objects for the shmpool hardening tests.

Module level so workers can import them by name (SPAWN workers find this folder through PYTHONPATH, set
in conftest.py).  Test-only: nothing here belongs in the package.

Failure injection
-----------------
`fail(failure, where)` performs one of FAILURES inside the *worker*:

    "raise"    raise JobBoom                       -> SubprocException (Name=JobBoom, traceback text)
    "exit"     os._exit(1)                          -> WorkerDiedError(exitcode=1)
    "segfault" ctypes.string_at(0)                  -> WorkerDiedError(exitcode=-SIGSEGV)
    "sigkill"  os.kill(os.getpid(), SIGKILL)        -> WorkerDiedError(exitcode=-SIGKILL)

at one of the phases of a job's life: while its arguments are unpickled (FailOnUnpickle), while it runs
(run_and_fail), while its result is pickled (FailOnPickle), or while the parent unpickles the result
(FailInParent; there a failure cannot kill the worker from inside it, see that class).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import signal
import threading
import time

FAILURES = ("raise", "exit", "segfault", "sigkill")


class JobBoom(Exception):
    """The exception a "raise" failure throws; its name must appear in the SubprocException."""


def note_pid(pidfile):
    """Atomically write this process's pid to `pidfile` (the test reads it with conftest.read_pid)."""
    if pidfile:
        tmp = f"{pidfile}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(str(os.getpid()))
        os.replace(tmp, pidfile)


def fail(failure, where):
    if failure == "raise":
        raise JobBoom(f"boom while {where}")
    if failure == "exit":
        os._exit(1)
    if failure == "segfault":
        ctypes.string_at(0)
    if failure == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # never reached: SIGKILL to self is delivered before kill() returns
    raise AssertionError(f"unknown failure {failure!r} (or it did not take effect) while {where}")


# --- phase 1: while the worker unpickles the arguments -------------------------------------------------
def _unpickle_and_fail(failure, pidfile):
    note_pid(pidfile)
    fail(failure, "unpickling the arguments")


class FailOnUnpickle:
    """Argument that pickles fine in the parent and runs fail() when the worker unpickles it."""

    def __init__(self, failure, pidfile):
        self.failure, self.pidfile = failure, pidfile

    def __reduce__(self):
        return (_unpickle_and_fail, (self.failure, self.pidfile))


class BadSetstate:
    """Argument whose __setstate__ raises in the worker (the other unpickle hook)."""

    def __init__(self):
        self.x = 1

    def __setstate__(self, state):
        raise JobBoom("boom in __setstate__")


# --- phase 2: while the job runs -----------------------------------------------------------------------
def run_and_fail(failure, pidfile, _arg=None):
    note_pid(pidfile)
    fail(failure, "running the job")


# --- phase 3: while the worker pickles the result ------------------------------------------------------
class FailOnPickle:
    """Result whose pickling (in the worker) runs fail()."""

    def __init__(self, failure):
        self.failure = failure

    def __reduce__(self):
        fail(self.failure, "pickling the result")


def return_fail_on_pickle(failure, pidfile):
    note_pid(pidfile)
    return FailOnPickle(failure)


# --- phase 4: while the parent unpickles the result ----------------------------------------------------
def _exit_1_on_sigusr1(signum, frame):
    os._exit(1)


def _unpickle_in_parent(action, worker_pid, value):
    """Runs in the parent.  It cannot make the (finished) worker fail from inside, so the closest
    meaningful thing: "raise" makes the parent's read fail; the deaths kill the worker that produced this
    result while the parent is still reading it (exit(1) via the SIGUSR1 handler the job installed)."""
    if action == "raise":
        raise JobBoom("boom while unpickling the result in the parent")
    sig = {"exit": signal.SIGUSR1, "segfault": signal.SIGSEGV, "sigkill": signal.SIGKILL}[action]
    os.kill(worker_pid, sig)
    return value


class FailInParent:
    def __init__(self, action, worker_pid, value):
        self.action, self.worker_pid, self.value = action, worker_pid, value

    def __reduce__(self):
        return (_unpickle_in_parent, (self.action, self.worker_pid, self.value))


def return_fail_in_parent(action, pidfile, value):
    if action == "exit":
        signal.signal(signal.SIGUSR1, _exit_1_on_sigusr1)
    note_pid(pidfile)
    return FailInParent(action, os.getpid(), value)


# --- ordinary jobs -------------------------------------------------------------------------------------
def add(a, b):
    return a + b


def identity(x):
    return x


def getpid():
    return os.getpid()


def sleep_return(seconds, value):
    time.sleep(seconds)
    return value


def sleep_return_pid(seconds):
    time.sleep(seconds)
    return os.getpid()


def note_pid_and_sleep(pidfile, seconds, value):
    note_pid(pidfile)
    time.sleep(seconds)
    return value


def return_lock():
    return threading.Lock()


def make_bytes(n):
    return b"\x5a" * n


def big_result_after_note(pidfile, n):
    """Build an n-byte result, announce the pid, then return it: the worker starts writing at once."""
    data = pattern(n, 7)
    note_pid(pidfile)
    return data


def len_and_sleep(data, seconds):
    time.sleep(seconds)
    return len(data)


_hoard = []


def hoard(nbytes, pidfile=None):
    """Allocate and *touch* nbytes and keep them alive in the worker; return the pid."""
    note_pid(pidfile)
    _hoard.append(b"\x01" * nbytes)
    return os.getpid()


# --- payload integrity ---------------------------------------------------------------------------------
_GOLDEN = 0x9E3779B97F4A7C15


def pattern(n: int, seed: int) -> bytes:
    """n bytes in which every 8-byte word differs (index * golden + seed): a misplaced chunk or a wrong
    offset changes the digest.  ~0.3 s for 256 MiB, much cheaper than random bytes."""
    import numpy as np

    words = n // 8
    a = np.arange(words, dtype=np.uint64)
    a *= np.uint64(_GOLDEN)
    a += np.uint64(seed & 0xFFFFFFFFFFFFFFFF)
    tail = bytes((seed + i) & 0xFF for i in range(n - words * 8))
    return a.tobytes() + tail if tail else a.tobytes()  # no concatenation copy for whole words


def digest(data) -> str:
    return hashlib.sha1(data).hexdigest()


def check_and_make(index, data, data_digest, out_size, out_seed):
    """Check the argument's hash, then return (index, pid, digest of out, out) with out of out_size bytes."""
    got = digest(data)
    if got != data_digest or len(data) < 0:
        raise JobBoom(f"job {index}: argument of {len(data)} bytes arrived corrupted ({got} != {data_digest})")
    out = pattern(out_size, out_seed)
    return index, os.getpid(), digest(out), out


# --- script for "SIGKILL the parent" (tests/hardening/test_hard_kill.py) -------------------------------
def busy_parent_main(kind_value: str, payload_bytes: int, ring_size: int):
    """Run a pool kept busy with big payloads both ways until killed.

    Prints one JSON line with the parent/worker/helper pids once both workers are up, then the line
    "busy" once big transfers have completed in both directions and more are in flight.
    """
    import json

    import shmpool

    pool = shmpool.SubprocPool(2, kind=shmpool.SubprocKind(kind_value), ring_size=ring_size)
    warm = [pool.submit(sleep_return, 0.2, i) for i in range(2)]
    for f in warm:
        f.result(timeout=60)
    print(json.dumps({"parent": os.getpid(), "workers": pool.worker_pids(), "helpers": pool.helper_pids()}), flush=True)
    payload = pattern(payload_bytes, 3)
    inflight = []
    done = 0
    announced = False
    while True:
        still = []
        for f in inflight:
            if f.done():
                f.result(timeout=0)
                done += 1
            else:
                still.append(f)
        inflight = still
        while len(inflight) < 4:
            inflight.append(pool.submit(len_and_make, payload, payload_bytes))
        if done >= 2 and not announced:
            print("busy", flush=True)
            announced = True
        time.sleep(0.005)


def len_and_make(data, n):
    return len(data), b"\xa5" * n


def limit_file_size(nbytes):
    """Initializer: cap the size of any file this worker creates (memfds included), so the next big
    one-off segment fails like an exhausted tmpfs would (EFBIG instead of ENOSPC/ENOMEM)."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get the errno, not the signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.RLIM_INFINITY))

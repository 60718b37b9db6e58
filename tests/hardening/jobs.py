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


def note_and_add(path, a, b):
    """``a + b``, after appending ``a`` to ``path`` (one short O_APPEND write: whole lines even
    from several processes), so a test can count how many times each job ran."""
    with open(path, "a") as f:
        f.write(f"{a}\n")
    return a + b


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


# --- issue 9 regression jobs (tests/hardening/test_hard_defects.py, test_hard_torture.py) ---------------
def bytes_digest(data) -> str:
    """sha1 of any contiguous buffer (bytes, bytearray, memoryview, C-contiguous numpy array)."""
    return hashlib.sha1(memoryview(data).cast("B")).hexdigest()


def digest_and_len(data):
    return bytes_digest(data), len(memoryview(data).cast("B"))


def sleep_then_digest(seconds, data):
    time.sleep(seconds)
    return bytes_digest(data)


_kept = None


def keep_and_digest(arr):
    """Keep a reference to the (in-place) array argument past the job's end; return its digest now."""
    global _kept
    _kept = arr
    return bytes_digest(arr)


def kept_digest():
    return bytes_digest(_kept)


def wait_for_file_then_die(path, seconds):
    """Block until `path` exists (bounded by `seconds`), then SIGKILL this worker."""
    end = time.monotonic() + seconds
    while not os.path.exists(path) and time.monotonic() < end:
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGKILL)


def worker_socket_fd() -> int:
    """The worker's one SOCK_SEQPACKET socket (its link to the parent), found via /proc/self/fd."""
    import socket
    import stat

    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            s = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if s.type == socket.SOCK_SEQPACKET:
                found.append(fd)
        finally:
            s.close()
    if len(found) != 1:
        raise AssertionError(f"expected one SEQPACKET socket in the worker, found fds {found}")
    return found[0]


def _current_job_id() -> int:
    """The id of the job this worker is running, read off the header in shmpool's worker frame.
    Test-only introspection of shmpool.worker.Worker._run_job's locals (checked against issue 9's code)."""
    import sys

    frame = sys._getframe()
    while frame is not None:
        header = frame.f_locals.get("header")
        if header is not None and hasattr(header, "job_id") and frame.f_code.co_name == "_run_job":
            return header.job_id
        frame = frame.f_back
    raise AssertionError("no shmpool _run_job frame on the stack")


def send_bad_reply(how, then_sleep=0.0, value="after-garbage", decoy_pid=0, ballast=b""):
    """Send the parent one malformed reply on this worker's own socket (defect 4), then return normally.

    how: "short"      11 bytes of garbage (not a header)
         "long"       64 bytes (a header plus junk: truncated on receipt)
         "bad_magic"  32 bytes with the wrong magic
         "wrong_job"  a valid RESULT header for a job id nobody sent
         "bad_region" a valid RESULT header for this job naming a region outside the ring
         "oneoff_pipe" a valid one-off RESULT header for this job carrying a pipe fd (cannot be mapped)
         "ready_decoy" a second READY, claiming the worker's pid is `decoy_pid` (a process the test owns)
         "in_job_segment" a RESULT header saying the result is in this job's one-off segment, 16 MiB
                      longer than that segment (or for a job that came through the ring: no segment)
         "settled_unknown"  a SETTLED for this job, which left no segment unsettled
    `ballast`: a payload that makes the job itself big (over the ring: a one-off segment)
    """
    import socket

    from shmpool import wire

    sock = socket.socket(fileno=os.dup(worker_socket_fd()))
    try:
        if how == "short":
            sock.send(b"garbage....")
        elif how == "long":
            sock.send(b"G" * 64)
        elif how == "bad_magic":
            sock.send(b"JUNK" + wire.encode(wire.MsgKind.RESULT, 1, 0, 8)[4:])
        elif how == "wrong_job":
            sock.send(wire.encode(wire.MsgKind.RESULT, 2**40 + 7, 0, 64))
        elif how == "bad_region":
            sock.send(wire.encode(wire.MsgKind.RESULT, _current_job_id(), 2**50, 1 << 40))
        elif how == "in_job_segment":
            length = len(ballast) + (16 << 20)
            sock.send(wire.encode(wire.MsgKind.RESULT, _current_job_id(), 0, length, wire.Flag.IN_JOB_SEGMENT))
        elif how == "settled_unknown":
            sock.send(wire.encode(wire.MsgKind.SETTLED, _current_job_id()))
        elif how == "ready_decoy":
            assert decoy_pid > 0
            sock.send(wire.encode(wire.MsgKind.READY, 0, decoy_pid))
        elif how == "oneoff_pipe":
            r, w = os.pipe()
            try:
                header = wire.encode(wire.MsgKind.RESULT, _current_job_id(), 0, 64, wire.Flag.ONEOFF)
                socket.send_fds(sock, [header], [r])
            finally:
                os.close(r)
                os.close(w)
        else:
            raise AssertionError(how)
    finally:
        sock.close()
    time.sleep(then_sleep)
    return value


def fork_sleeper(seconds):
    """Fork a grandchild that inherits every fd of the worker (its socket included) and sleeps."""
    pid = os.fork()
    if pid == 0:
        try:
            time.sleep(seconds)
        finally:
            os._exit(0)
    return pid


def shut_socket_and_linger(seconds, pidfile=None):
    """Close this worker's link (the parent sees EOF) but keep the process alive for `seconds`."""
    import socket

    note_pid(pidfile)
    sock = socket.socket(fileno=os.dup(worker_socket_fd()))
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    time.sleep(seconds)
    return "lingered"


def limit_address_space(headroom):
    """Initializer: cap this worker's address space at its current size plus `headroom` bytes."""
    import resource

    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + headroom, resource.RLIM_INFINITY))


def use_up_fds():
    """Lower this worker's fd limit to its lowest free fd: the next fd it is sent is dropped."""
    import resource

    lowest = os.dup(0)
    os.close(lowest)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    return os.getpid()


def fail_after_first_start(counter_path, how):
    """Initializer: the first worker start (by a counter file under an fcntl lock) succeeds, every
    later one fails: "raise" raises JobBoom, "exit" calls os._exit(3)."""
    import fcntl

    with open(counter_path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        n = int(f.read() or 0)
        f.seek(0)
        f.truncate()
        f.write(str(n + 1))
        f.flush()
        fcntl.flock(f, fcntl.LOCK_UN)
    if n == 0:
        return
    if how == "exit":
        os._exit(3)
    raise JobBoom(f"start {n + 1} refused by the test initializer")


def torture_job(index, data, data_digest, out_size, out_seed, seconds):
    """Check the argument's digest, optionally sleep, return (index, digest of out, out)."""
    got = bytes_digest(data)
    if got != data_digest:
        raise JobBoom(f"job {index}: argument arrived corrupted ({got} != {data_digest})")
    if seconds:
        time.sleep(seconds)
    out = pattern(out_size, out_seed) if out_size else b""
    return index, bytes_digest(out), out


def _spin():
    while True:
        pass


def start_gil_spinner(switch_interval):
    """Make this worker slow to get the GIL back after any blocking call (a loaded machine, made
    deterministic): a daemon thread spins in pure Python and the switch interval is raised, so every
    step the worker takes after a syscall (e.g. freeing a ring slot right after sending its reply)
    lands up to `switch_interval` seconds later."""
    import sys

    sys.setswitchinterval(switch_interval)
    threading.Thread(target=_spin, name="gil-spinner", daemon=True).start()
    return os.getpid()


# --- round 3 regression jobs (tests/hardening/test_hard_round3.py) --------------------------------------
def wait_for_file(path, seconds, value, started=None, at_least=0.0):
    """A gate: announce it runs (creates `started`, if given), block until `path` exists (bounded by
    `seconds`) and `at_least` seconds have passed since it started, then return `value`."""
    t0 = time.monotonic()
    if started:
        open(started, "w").close()
    end = t0 + seconds
    while not os.path.exists(path) and time.monotonic() < end:
        time.sleep(0.005)
    left = t0 + at_least - time.monotonic()
    if left > 0:
        time.sleep(left)
    return value


def full_array(n, v):
    """An n-byte uint8 numpy array of value v (a result the parent unpickles)."""
    import numpy as np

    return np.full(n, v, dtype=np.uint8)


def _raise_system_exit_on_load():
    raise SystemExit("raised while the parent unpickles the result (test)")


def _raise_keyboard_interrupt_on_load():
    raise KeyboardInterrupt("raised while the parent unpickles the result (test)")


class BaseExceptionOnLoad:
    """A result that pickles fine in the worker; unpickling it (in the parent) raises SystemExit
    ("exit") or KeyboardInterrupt ("kbi"), BaseExceptions that are not Exceptions."""

    def __init__(self, which):
        self.which = which

    def __reduce__(self):
        if self.which == "exit":
            return (_raise_system_exit_on_load, ())
        return (_raise_keyboard_interrupt_on_load, ())


def return_base_exception_on_load(which):
    return BaseExceptionOnLoad(which)


def sleep_holding_the_gil(seconds, value):
    """Sleep in one C call that keeps the GIL (libc usleep through ctypes.PyDLL): no other thread
    of this process runs Python meanwhile, as in a long numpy or regex call."""
    import ctypes

    ctypes.PyDLL(None).usleep(int(seconds * 1_000_000))
    return value

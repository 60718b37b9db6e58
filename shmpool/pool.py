"""The pool's front end: the caller's API. The dispatcher thread lives in dispatcher.py, the
shared state and job placement in core.py, job and worker states in lifecycle.py.

Where the bytes go (one job, N bytes each way)::

  caller thread                      dispatcher thread                worker process
  -------------                      -----------------                --------------
  submit(fn, *a)
    pickle -> Parts (pieces held
    by reference, no copy)
    a ready worker has room:
      write into its request ring  ------------------------------->  COPY 1 (sender)
      header --SEQPACKET socket-------------------------------------> mark the job taken
    else: a private copy is queued                                    unpickle from the ring
      (the caller may change its                                        in-band bytes: COPY 2
      arrays once submit returns)   after a reply, place it:            big arrays: 0, used in
                                      write into the ring               place through a mapping
                                                                        of the job's own
                                                                      run fn
                                                                      pickle the result into
                                                                        the response ring: COPY 3
                                                                      free the request region,
                                                                        then send the header
                                     recv header <--socket--
                                     unpickle: COPY 4, free the slot
  future.result()  <--set_result--

Payloads larger than the ring go through a one-off memfd sent beside the header instead, with
the same copies. Only 32-byte headers ever cross the socket.
"""
from __future__ import annotations

import atexit
import enum
import itertools
import os
import pickle
import signal
import subprocess
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

from .arguments import checked_callable, checked_count, checked_env, checked_seconds, dump_submitted
from .core import PoolCore, PoolStats, new_pool_lock, refuse_reentry
from .dispatcher import JOIN_LIMIT, Dispatcher
from .errors import SubprocException, describe_job, remote_error
from .futures import JobFuture
from .interrupts import deferred_signals
from .lifecycle import Job
from .pickler import SubprocPickler, has_zero_copy
from .shm import sweep_stale

__all__ = ["DEFAULT_RING_SIZE", "MIN_RING_SIZE", "PoolStats", "SubprocKind", "SubprocPool"]

# Per direction per worker. Only pages a payload has touched use memory, and they stay (warm)
# until the worker exits or the pool quiesces: a 256 MiB ring costs nothing for small jobs and
# carries a 128 MiB FX graph without a one-off segment.
DEFAULT_RING_SIZE = 256 << 20
MIN_RING_SIZE = 1 << 20  # INIT (sys.path, pickler, initializer) must fit in the ring
# Seconds a starting worker gets to become READY before it is killed as a failed start (a fresh
# interpreter takes well under 1 s here; the initializer, torch's imports, run inside the window).
START_TIMEOUT = 60.0
START_TIMEOUT_WITH_INITIALIZER = 600.0


class SubprocKind(enum.Enum):
    FORK = "fork"
    SPAWN = "spawn"



_live_pools: "weakref.WeakSet[SubprocPool]" = weakref.WeakSet()


@atexit.register
def _shutdown_all() -> None:
    for pool in list(_live_pools):
        try:
            pool.shutdown()
        except subprocess.TimeoutExpired:
            pass  # bounded: the interpreter exits, and PDEATHSIG ends what is left


def _forget_pools_in_child() -> None:
    # A fork of the caller inherits our pools' objects but none of their threads, and writing
    # into their rings would cross the parent's jobs. The child's copies refuse all use.
    for pool in list(_live_pools):
        pool._forked = True
        # Another thread may have held the lock at the fork, and no thread here will release it.
        pool._core.lock = new_pool_lock()
    _live_pools.clear()


os.register_at_fork(after_in_child=_forget_pools_in_child)


class PoolProcesses:
    """``pool.process``: the pool's processes as one handle, for code written against torch's
    pool, whose ``process`` is its sidecar's ``Popen``. ``pid`` is the FORK helper's (SPAWN:
    the first worker's); ``wait()`` returns once every process of the pool has exited (after
    ``shutdown()``), ``poll()`` is None until then; ``kill()`` SIGKILLs them all and shuts the
    pool down."""

    def __init__(self, pool: "SubprocPool") -> None:
        self._pool = weakref.ref(pool)
        self._exited = pool._dispatcher.all_exited

    @property
    def pid(self) -> int | None:
        pool = self._pool()
        if pool is None:
            return None
        pids = pool.helper_pids() or pool.worker_pids()
        return pids[0] if pids else None

    @property
    def returncode(self) -> int | None:
        return 0 if self._exited.is_set() else None

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._exited.wait(timeout):
            raise subprocess.TimeoutExpired("shmpool pool processes", timeout or 0.0)
        return 0

    def kill(self) -> None:
        pool = self._pool()
        if pool is not None:
            pool._kill_all()

    terminate = kill


class SubprocPool:
    """A drop-in for torch's ``SubprocPool`` whose payloads travel through shared memory.

    ``initializer(*initargs)`` runs in every worker start (also after a quiesce or a crash);
    ``env`` entries are set in each worker's ``os.environ`` before it; ``job_timeout`` is the
    default per-job timeout (``submit_job`` overrides it); ``max_payload`` caps one pickled job
    or result in bytes; ``worker_memory_cap`` recycles a worker whose RSS passes it between jobs;
    ``preload`` names modules the FORK helper imports once so forked workers start warm;
    ``max_spare_bytes`` bounds the segments of payloads over the ring kept warm for the next
    one (default a quarter of memory, 0 keeps none; see spares.py); ``worker_start_timeout``
    is how long a starting worker may take to become ready before it is killed and counted as a
    failed start (default START_TIMEOUT, or START_TIMEOUT_WITH_INITIALIZER; ``math.inf``: no limit).
    """

    # What a job that raised in its worker fails with, built as ``remote_error_class(details,
    # name)``: a SubprocException that is torch's too once torch is loaded (errors.remote_error).
    remote_error_class: Callable[[str, str], SubprocException] = staticmethod(remote_error)
    _forked = False  # set in a forked child of the process that made the pool

    def __init__(
        self,
        nprocs: int,
        pickler: SubprocPickler | None = None,
        kind: SubprocKind = SubprocKind.FORK,
        quiesce: bool = False,
        *,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        env: Mapping[str, str] | None = None,
        quiesce_after: float = 60.0,
        job_timeout: float | None = None,
        max_payload: int | None = None,
        worker_memory_cap: int | None = None,
        ring_size: int = DEFAULT_RING_SIZE,
        preload: tuple[str, ...] = (),
        max_spare_bytes: int | None = None,
        worker_start_timeout: float | None = None,
    ) -> None:
        nprocs = checked_count("nprocs", nprocs, 1)  # type: ignore[assignment]
        ring_size = checked_count("ring_size", ring_size, MIN_RING_SIZE, " bytes")  # type: ignore[assignment]
        max_payload = checked_count("max_payload", max_payload, 1, " bytes", optional=True)
        worker_memory_cap = checked_count("worker_memory_cap", worker_memory_cap, 1, " bytes", optional=True)
        max_spare_bytes = checked_count("max_spare_bytes", max_spare_bytes, 0, " bytes", optional=True)
        checked_callable("initializer", initializer, optional=True)
        self.nprocs = nprocs
        self.pickler = pickler or SubprocPickler()
        try:
            self.kind = SubprocKind(getattr(kind, "value", kind))  # torch's SubprocKind has the same values
        except ValueError:
            raise ValueError(f"kind must be SubprocKind.FORK or SubprocKind.SPAWN ('fork' or 'spawn'), got {kind!r}") from None
        self._job_timeout = checked_seconds("job_timeout", job_timeout)
        quiesce_after = checked_seconds("quiesce_after", quiesce_after)
        self._max_payload = max_payload
        # Pickled once here, so a pickler or initializer that cannot travel fails now, loudly.
        boot = {
            "pickler": pickle.dumps(self.pickler, pickle.HIGHEST_PROTOCOL),
            "initializer": None if initializer is None else self.pickler.dumps((initializer, tuple(initargs))),
            "environ": checked_env(env),
            "max_payload": max_payload,
            "memory_cap": worker_memory_cap,
        }
        self._core = PoolCore(nprocs, has_zero_copy(self.pickler), self.remote_error_class, max_spare_bytes)
        self._job_ids = itertools.count(1)  # 0 names a worker's set-up (wire.SETUP_JOB_ID)
        self._dispatcher = Dispatcher(
            self._core, self.kind is SubprocKind.SPAWN, ring_size, tuple(preload), boot, self.pickler
        )
        if quiesce:
            self._dispatcher.auto_quiesce_after = quiesce_after
        if worker_start_timeout is None:  # default: generous for an interpreter's start, more so with an initializer
            worker_start_timeout = START_TIMEOUT if initializer is None else START_TIMEOUT_WITH_INITIALIZER
        self._dispatcher.start_timeout = checked_seconds("worker_start_timeout", worker_start_timeout)
        self.process = PoolProcesses(self)
        sweep_stale()
        self._dispatcher.thread.start()
        _live_pools.add(self)

    # ---------------------------------------------------------------- the caller's API

    def submit(self, job_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        """Run ``job_fn(*args, **kwargs)`` in a worker. Pickling errors raise here, at once.
        The job sees its arguments as they were when ``submit`` returned."""
        return self.submit_job(job_fn, args, kwargs)

    def submit_job(
        self,
        job_fn: Callable[..., Any],
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Future:
        """``submit`` with options: ``timeout`` seconds of running time, after which the
        future fails with ``JobTimeoutError`` and the worker is replaced."""
        self._check_usable()
        refuse_reentry(self._core.lock)
        job_timeout = checked_seconds("timeout", timeout) if timeout is not None else self._job_timeout
        parts = dump_submitted(job_fn, args, kwargs, self.pickler, self._max_payload)
        job = Job(next(self._job_ids), JobFuture(self._dispatcher.thread), parts, job_timeout, describe_job(job_fn))
        core = self._core
        with deferred_signals():  # placed and announced (or queued) together, or not at all
            done, was_quiesced = self._place_at_once(job)
            if not done:
                # No room now: keep a private copy (outside the lock: it may be big), then queue.
                job.payload = core.frozen(parts)
                with core.lock:
                    if core.closing:
                        job.drop_payload()
                        raise RuntimeError("cannot submit to a SubprocPool after shutdown()")
                    self._queue(job, was_quiesced)
        core.flush()
        return job.future

    def _place_at_once(self, job: Job) -> tuple[bool, bool]:
        """Put ``job`` straight into a worker's ring if one has room (under a stream of short
        jobs, behind others: core.SHORT_JOB_PIPELINE_DEPTH, so a worker finds its next job
        waiting), or, if its bytes cannot change, into the queue; returns whether it was either,
        and whether the pool was quiesced. A placed job's header is sent once the lock is
        released, so the dispatcher is not held up by the send; the worker counts as full until
        then, which keeps its headers in order."""
        core = self._core
        header: list[bytes] = []
        w = None
        try:
            with core.lock:
                self._check_usable()
                core.counts["jobs_submitted"] += 1
                now = core.last_activity = time.monotonic()
                was_quiesced, core.quiesced = core.quiesced, False
                w = None if core.pending else core.pick_worker(now)
                # A busy worker's header waits for its next reply (the dispatcher sends it then):
                # no wake-up of a worker that is busy anyway, no send that stalls this thread.
                if w is not None and w.inflight:
                    done = core.place(w, job, now, w.deferred) is not None
                else:
                    done = w is not None and core.place(w, job, now, header) is not None
                if header:
                    w.unsent = True  # type: ignore[union-attr]
                if done and (was_quiesced or job.timeout is not None):
                    self._dispatcher.wake()  # restart workers / watch the deadline
                elif not done and not job.payload.mutable:  # type: ignore[union-attr]
                    self._queue(job, was_quiesced)  # nothing to copy: queued in this same hold
                    done = True
        finally:
            if header:  # a header in hand is a job noted as w's: sent whatever came after
                core.send_now(w, header)  # type: ignore[arg-type]
        return done, was_quiesced

    def _queue(self, job: Job, was_quiesced: bool) -> None:
        """Under lock: ``job``, which could not be placed, waits in the queue."""
        core = self._core
        behind = bool(core.pending)
        core.enqueue(job)
        # Jobs waiting already: the last try found no room, and whatever makes room (a reply, a
        # READY, an exit) has the dispatcher place the queue; this one joins it without another
        # try (the submitter's hot path under a burst).
        if not behind:
            try:
                core.place_pending(core.last_activity)
                self._dispatcher.reset_start_failures(unless_live=True)
            except BaseException:
                self._dispatcher.wake()  # a queue nobody was asked to place: the dispatcher will
                raise
        if was_quiesced or job.timeout is not None or self._dispatcher.short_handed:
            self._dispatcher.wake()

    def quiesce(self) -> None:
        """Stop the workers to give their memory back; the next job or ``wakeup()`` restarts them."""
        if self._forked:
            return
        with self._core.guarded():
            if not self._core.pending:
                self._core.quiesced = True
            self._dispatcher.wake()

    def wakeup(self) -> None:
        """Start the workers now (after a quiesce), so the next job does not wait for them."""
        if self._forked:
            return
        with self._core.guarded():
            self._core.quiesced = False
            self._dispatcher.reset_start_failures()
            self._dispatcher.wake()

    def shutdown(self, wait: bool = True) -> None:
        """Stop the pool. Every unfinished future fails with RuntimeError; idempotent; safe
        from atexit, from another thread and from a future's done-callback."""
        if self._forked:
            return  # the parent's pool: not ours to stop
        core = self._core
        with core.guarded():
            first = not core.closing
            core.closing = True
            pending = list(core.pending)
            core.pending.clear()
            closed = RuntimeError("SubprocPool closed")
            for job in pending:
                # Failed, not cancel()led: concurrent.futures.wait() only wakes for a cancelled
                # future once someone calls set_running_or_notify_cancel() on it.
                core.resolve(job, exc=closed)
            if first:
                self._dispatcher.wake()
        core.flush()
        _live_pools.discard(self)
        if wait and threading.current_thread() is not self._dispatcher.thread:
            # Through the handle, as torch's shutdown waits on its sidecar: code that patched
            # ``process.wait`` (torch's tests do) sees it called.
            self.process.wait(JOIN_LIMIT)

    def stats(self) -> PoolStats:
        self._check_owned()
        return self._core.stats()

    def worker_pids(self) -> list[int]:
        """Pids of the live workers (FORK: their pids as the fork helper reported them)."""
        self._check_owned()
        with self._core.guarded():
            return [w.pid for w in self._core.workers.values() if w.pid is not None and w.live]

    def helper_pids(self) -> list[int]:
        """Pid of the FORK helper, if one is running."""
        pid = self._dispatcher.helper_pid
        return [pid] if pid is not None else []

    def __enter__(self) -> "SubprocPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---------------------------------------------------------------- internals

    def _check_owned(self) -> None:
        if self._forked:
            raise RuntimeError(
                f"this SubprocPool belongs to the process that created it, not to this forked "
                f"child (pid {os.getpid()}): create a new SubprocPool in the child"
            )

    def _check_usable(self) -> None:
        self._check_owned()
        if self._core.closing:
            raise RuntimeError("cannot submit to a SubprocPool after shutdown()")

    def _kill_all(self) -> None:
        """SIGKILL every process of the pool, then shut it down (``process.kill()``: a pool
        whose processes were killed from outside is over, as torch's is when its sidecar is)."""
        for pid in self.worker_pids() + self.helper_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass  # gone already
        self.shutdown(wait=False)


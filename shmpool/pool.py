"""The pool front end and its dispatcher thread.

Where the bytes go (one job, N bytes each way)::

  caller thread                     dispatcher thread                    worker process
  -------------                     -----------------                    --------------
  submit(fn, *a)
    pickle -> Parts (pieces held
    by reference, no copy)  --queue-->  pick an idle worker
                                        Parts.write_into(request ring)   COPY 1 (sender)
                                        header --SEQPACKET socket-->     recv header, mark it taken
                                                                         unpickle from the ring
                                                                           in-band bytes: COPY 2
                                                                           numpy/PickleBuffer: 0
                                                                         free the slot (semaphore;
                                                                           after the reply if the
                                                                           job uses it in place)
                                                                         run fn
                                                                         pickle result into the
                                                                           response ring: COPY 3
                                        recv header <--socket--          header
                                        unpickle from the ring: COPY 4
                                        free the slot (semaphore)
  future.result()  <--set_result--

Payloads larger than the ring go through a one-off memfd sent beside the header instead, with
the same copies. Only 32-byte headers ever cross the socket.

Threads: a caller pickles its job outside any lock, then, under the pool's one lock, places it
straight into an idle worker's request ring (or queues it). One dispatcher thread starts every
process (so PDEATHSIG is tied to a thread that lives as long as the workers), reads replies,
notices deaths and enforces timeouts; after each reply it places the next queued job before
unpickling the result, so the two overlap. It never polls: it blocks in one ``select`` over
every worker socket, the fork helper's socket and a wake-up pipe, with a timeout only when a
deadline is pending. Futures are resolved outside the lock, so done-callbacks may call back in.
"""
from __future__ import annotations

import atexit
import collections
import dataclasses
import enum
import functools
import itertools
import logging
import os
import pickle
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

from . import wire
from .channel import Endpoint, recv_header
from .codec import CodecError, Parts, dump, load
from .errors import (
    JobTimeoutError,
    describe_exit,
    PayloadTooLargeError,
    SubprocException,
    WorkerDiedError,
    WorkerStartError,
)
from .launch import ForkHelper, spawn_worker, stop_process
from .pickler import SubprocPickler, has_zero_copy
from .ring import RingError, RingReader, RingWriter
from .shm import Segment, SharedMemoryError, create_semaphore, new_semaphore_name, sweep_stale, unlink_semaphore

log = logging.getLogger(__name__)

# Per direction per worker. Only pages a payload has touched use memory, and they stay (warm)
# until the worker exits or the pool quiesces: a 256 MiB ring costs nothing for small jobs and
# carries a 128 MiB FX graph without a one-off segment.
DEFAULT_RING_SIZE = 256 << 20
MIN_RING_SIZE = 1 << 20  # INIT (sys.path, pickler, initializer) must fit in the ring
# Jobs placed on one worker at a time. One, unless more jobs wait than there are workers and
# recent jobs have been short: then up to four ride in each worker's ring, so a worker starts
# its next job the moment it sends a result instead of idling through our wake-up (about 1.5-2x
# small-job throughput here). Long jobs are never stacked: a job placed behind a slow one would
# wait while another worker sits idle.
PIPELINE_DEPTH = 1
SHORT_JOB_PIPELINE_DEPTH = 4
SHORT_JOB_SECONDS = 0.002  # running average under this: a job queued behind one costs little
JOB_SECONDS_WEIGHT = 0.1  # weight of the newest job in that running average
QUIT_GRACE = 2.0  # seconds workers get to exit after QUIT (idle) or SIGTERM (busy) at shutdown
TERM_GRACE = 1.0  # seconds after SIGTERM before SIGKILL
EXIT_STATUS_WAIT = 5.0  # seconds to wait for a dead worker's exit status before failing its job anyway
MAX_START_FAILURES = 3  # consecutive workers dying before READY: stop retrying, fail the queue
START_RETRY_DELAY = 0.5  # seconds before trying again to start a worker that could not be started
JOIN_LIMIT = 30.0  # seconds shutdown(wait=True) waits for the dispatcher's teardown
_PLAIN = SubprocPickler()


class SubprocKind(enum.Enum):
    FORK = "fork"
    SPAWN = "spawn"


@dataclasses.dataclass(frozen=True)
class PoolStats:
    """Counters since the pool started. ``copied_*`` counts payload bytes memcpy'd on the way
    (sender's write into shared memory plus receiver's read out of it), so
    ``copied_to_workers / bytes_to_workers`` is the copies each byte took (2.0 for pickled bytes,
    about 1.0 for numpy arrays sent out of band)."""

    jobs_submitted: int = 0
    jobs_completed: int = 0
    jobs_failed: int = 0
    bytes_to_workers: int = 0
    bytes_from_workers: int = 0
    copied_to_workers: int = 0
    copied_from_workers: int = 0
    oneoff_segments: int = 0
    workers_started: int = 0
    workers_died: int = 0


class _Job:
    __slots__ = ("job_id", "future", "parts", "timeout", "deadline", "desc", "started", "head_since")

    def __init__(self, job_id: int, future: Future, parts: Parts, timeout: float | None, desc: str) -> None:
        self.job_id = job_id
        self.future = future
        self.parts = parts
        self.timeout = timeout
        self.deadline: float | None = None
        self.desc = desc
        self.started = False
        self.head_since = 0.0


class _Worker:
    __slots__ = (
        "serial", "endpoint", "sem_names", "proc", "pid", "inflight", "ready", "quitting",
        "eof_at", "exitcode", "status_known", "timed_out",
    )

    def __init__(self, serial: int, endpoint: Endpoint, sem_names: tuple[str, str]) -> None:
        self.serial = serial
        self.endpoint = endpoint
        self.sem_names = sem_names
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None
        self.inflight: collections.deque[_Job] = collections.deque()
        self.ready = False
        self.quitting = False  # no new jobs: QUIT sent, RECYCLE seen, or killed
        self.eof_at: float | None = None
        self.exitcode: int | None = None
        self.status_known = False
        self.timed_out = False


def _settle(future: Future, result: Any = None, exc: BaseException | None = None) -> bool:
    """Resolve a future unless it already is. Never raises."""
    if future.done():
        return False
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
    except Exception:  # InvalidStateError from a race with cancel(): the caller already gave up
        return False
    return True


def _describe(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
    module = getattr(fn, "__module__", None)
    return f"{module}.{name}" if module else str(name)


_live_pools: "weakref.WeakSet[SubprocPool]" = weakref.WeakSet()


@atexit.register
def _shutdown_all() -> None:
    for pool in list(_live_pools):
        pool.shutdown()


class SubprocPool:
    """A drop-in for torch's ``SubprocPool`` whose payloads travel through shared memory.

    ``initializer(*initargs)`` runs in every worker start (also after a quiesce or a crash);
    ``env`` entries are set in each worker's ``os.environ`` before it; ``job_timeout`` is the
    default per-job timeout (``submit_job`` overrides it); ``max_payload`` caps one pickled job
    or result in bytes; ``worker_memory_cap`` recycles a worker whose RSS passes it between jobs;
    ``preload`` names modules the FORK helper imports once so forked workers start warm.
    """

    # What a job that raised in its worker fails with: built as ``remote_error_class(details,
    # name)``. torch's glue sets a class that is also torch's own SubprocException.
    remote_error_class: type[SubprocException] = SubprocException

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
    ) -> None:
        if nprocs < 1:
            raise ValueError(f"nprocs must be at least 1, got {nprocs}")
        if ring_size < MIN_RING_SIZE:
            raise ValueError(f"ring_size must be at least {MIN_RING_SIZE} bytes, got {ring_size}")
        self.nprocs = nprocs
        self.pickler = pickler or SubprocPickler()
        self.kind = SubprocKind(kind)
        self._auto_quiesce = quiesce
        self._quiesce_after = quiesce_after
        self._job_timeout = job_timeout
        self._max_payload = max_payload
        self._ring_size = ring_size
        self._preload = tuple(preload)
        # Pickled once here, so a pickler or initializer that cannot travel fails now, loudly.
        self._boot = {
            "pickler": pickle.dumps(self.pickler, pickle.HIGHEST_PROTOCOL),
            "initializer": None if initializer is None else self.pickler.dumps((initializer, tuple(initargs))),
            "environ": dict(env or {}),
            "max_payload": max_payload,
            "memory_cap": worker_memory_cap,
        }
        self._zero_copy = has_zero_copy(self.pickler)

        self._lock = threading.Lock()
        self._pending: collections.deque[_Job] = collections.deque()  # guarded by _lock
        self._closing = False  # guarded by _lock
        self._quiesced = False  # guarded by _lock
        self._job_ids = itertools.count(1)  # 0 is the worker's own (initializer) message
        self._stats: dict[str, int] = dataclasses.asdict(PoolStats())
        self._to_settle: list[tuple[Future, Any, BaseException | None]] = []  # guarded by _lock
        self._chores = True  # dispatcher: check deadlines, worker count and the queue next round
        self._job_seconds = SHORT_JOB_SECONDS  # running average of job time: no stacking before a short job is seen

        # Dispatcher-thread state from here on.
        self._workers: dict[int, _Worker] = {}
        self._serials = itertools.count(1)
        self._helper: ForkHelper | None = None
        self._start_failures = 0
        self._start_error: str | None = None
        self._start_retry_at: float | None = None  # a start failed: try again then
        self._last_activity = time.monotonic()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._drain_wake)

        sweep_stale()
        self._thread = threading.Thread(target=self._run, name="shmpool-dispatch", daemon=True)
        self._thread.start()
        _live_pools.add(self)

    # ---------------------------------------------------------------- caller side

    def submit(self, job_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        """Run ``job_fn(*args, **kwargs)`` in a worker. Pickling errors raise here, at once."""
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
        if self._closing:
            raise RuntimeError("cannot submit to a SubprocPool after shutdown()")
        parts = dump((job_fn, tuple(args), dict(kwargs or {})), self.pickler)
        if self._max_payload is not None and parts.size > self._max_payload:
            raise PayloadTooLargeError(f"job {_describe(job_fn)}", parts.size, self._max_payload)
        future: Future = Future()
        job_timeout = timeout if timeout is not None else self._job_timeout
        job = _Job(next(self._job_ids), future, parts, job_timeout, _describe(job_fn))
        with self._lock:
            if self._closing:
                raise RuntimeError("cannot submit to a SubprocPool after shutdown()")
            was_quiesced = self._quiesced
            self._quiesced = False
            self._start_failures = 0  # a new job is worth one more start attempt
            self._stats["jobs_submitted"] += 1
            self._last_activity = time.monotonic()
            self._pending.append(job)
            # Place it now, from this thread, when a worker is idle: the dispatcher only needs
            # waking when it has something to do (start workers, watch a deadline).
            self._place_pending(self._last_activity)
            if self._pending or was_quiesced or job_timeout is not None or self._auto_quiesce:
                self._wake()
        self._flush()
        return future

    def quiesce(self) -> None:
        """Stop the workers to give their memory back; the next job or ``wakeup()`` restarts them."""
        with self._lock:
            if not self._pending:
                self._quiesced = True
            self._wake()

    def wakeup(self) -> None:
        """Start the workers now (after a quiesce), so the next job does not wait for them."""
        with self._lock:
            self._quiesced = False
            self._start_failures = 0
            self._wake()

    def shutdown(self, wait: bool = True) -> None:
        """Stop the pool. Every unfinished future fails with RuntimeError; idempotent; safe
        from atexit, from another thread and from a future's done-callback."""
        with self._lock:
            first = not self._closing
            self._closing = True
            pending = list(self._pending)
            self._pending.clear()
            if first:
                self._wake()
        if first:
            for job in pending:
                # Failed, not cancel()led: concurrent.futures.wait() only wakes for a cancelled
                # future once someone calls set_running_or_notify_cancel() on it.
                _settle(job.future, exc=RuntimeError("SubprocPool closed"))
        if wait and threading.current_thread() is not self._thread:
            self._thread.join(JOIN_LIMIT)

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(**self._stats)

    def worker_pids(self) -> list[int]:
        """Pids of the live workers (FORK: their pids as the fork helper reported them)."""
        with self._lock:
            return [w.pid for w in self._workers.values() if w.pid is not None and w.eof_at is None]

    def helper_pids(self) -> list[int]:
        """Pid of the FORK helper, if one is running."""
        helper = self._helper
        return [helper.pid] if helper is not None else []

    def __enter__(self) -> "SubprocPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---------------------------------------------------------------- shared, under _lock

    def _wake(self) -> None:
        """Nudge the dispatcher. Call with ``_lock`` held: teardown closes the pipe under it."""
        if self._wake_w < 0:
            return
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: a wake-up is already pending

    def _fail(self, job: _Job, exc: BaseException) -> None:
        """Queue ``job``'s failure; ``_flush`` delivers it outside the lock (callbacks run then)."""
        job.parts.release()
        if not job.future.done():
            self._stats["jobs_failed"] += 1
            self._to_settle.append((job.future, None, exc))

    def _flush(self) -> None:
        """Resolve queued futures. Call without ``_lock``: done-callbacks may call back in."""
        if not self._to_settle:
            return
        with self._lock:
            todo, self._to_settle = self._to_settle, []
        for future, value, exc in todo:
            _settle(future, value, exc)

    def _place_pending(self, now: float) -> None:
        """Put queued jobs into idle workers' request rings."""
        full: set[int] = set()
        while self._pending and not self._closing:
            job = self._pending[0]
            backlog = len(self._pending) > len(self._workers)
            depth = SHORT_JOB_PIPELINE_DEPTH if backlog and self._job_seconds < SHORT_JOB_SECONDS else PIPELINE_DEPTH
            candidates = [
                w for w in self._workers.values()
                if w.ready and not w.quitting and len(w.inflight) < depth and w.serial not in full
            ]
            if not candidates:
                return
            w = min(candidates, key=lambda c: len(c.inflight))
            if not job.started:
                if not job.future.set_running_or_notify_cancel():
                    self._pending.popleft()  # cancelled while queued
                    continue
                job.started = True
            try:
                placed = w.endpoint.send_payload(wire.MsgKind.JOB, job.job_id, job.parts)
            except SharedMemoryError as e:
                self._pending.popleft()
                self._fail(job, e)
                continue
            except ConnectionError:
                w.quitting = True  # its socket broke: it is dying, and EOF will say how
                continue
            except OSError as e:
                # Not the worker's fault, but its ring may now hold a region it will never
                # free: fail the job, retire the worker.
                self._pending.popleft()
                self._fail(job, e)
                self._kill(w)
                continue
            if not placed:
                full.add(w.serial)  # its ring is still busy with the previous job's result
                continue
            self._pending.popleft()
            w.inflight.append(job)
            if len(w.inflight) == 1:
                self._job_starts(job, now)
            size = job.parts.size
            self._stats["bytes_to_workers"] += size
            # The sender's write, plus the worker's read of all but what it uses in place, plus
            # the extra copy a dumps()-only pickler makes before shmpool sees the bytes.
            self._stats["copied_to_workers"] += size + (size - job.parts.oob_bytes) + (0 if self._zero_copy else size)
            if size > w.endpoint.oneoff_threshold:
                self._stats["oneoff_segments"] += 1

    @staticmethod
    def _job_starts(job: _Job, now: float) -> None:
        """``job`` is now the one its worker runs: its clock (and timeout) starts."""
        job.head_since = now
        if job.timeout is not None:
            job.deadline = now + job.timeout

    def _kill(self, w: _Worker) -> None:
        w.quitting = True
        self._signal(w, signal.SIGKILL)

    @staticmethod
    def _signal(w: _Worker, signum: int) -> None:
        try:
            if w.proc is not None:
                w.proc.send_signal(signum)
            elif w.pid is not None:
                os.kill(w.pid, signum)
        except OSError:
            pass  # already gone

    # ---------------------------------------------------------------- dispatcher thread

    def _drain_wake(self) -> None:
        self._chores = True
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _run(self) -> None:
        try:
            while not self._closing:
                events = self._selector.select(self._next_timeout())
                if not events:
                    self._chores = True  # a deadline came due
                for key, _ in events:
                    key.data()
                    self._flush()
                # A plain reply needs nothing more (it placed the next job itself); skipping the
                # chores then keeps the GIL free for the caller waking up on its result.
                if not self._chores:
                    continue
                self._chores = False
                with self._lock:
                    if self._closing:
                        break
                    now = time.monotonic()
                    self._expire(now)
                    self._start_or_stop_workers()
                    self._place_pending(now)
                self._flush()
        except BaseException:
            log.exception("shmpool dispatcher failed; failing every job")
        finally:
            with self._lock:
                self._closing = True
            self._teardown()

    def _next_timeout(self) -> float | None:
        with self._lock:
            deadlines = [w.inflight[0].deadline for w in self._workers.values() if w.inflight and w.inflight[0].deadline]
            deadlines += [w.eof_at + EXIT_STATUS_WAIT for w in self._workers.values() if w.eof_at is not None]
            if self._auto_quiesce and not self._quiesced and self._workers:
                deadlines.append(self._last_activity + self._quiesce_after)
            if self._start_retry_at is not None:
                deadlines.append(self._start_retry_at)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _expire(self, now: float) -> None:
        for w in list(self._workers.values()):
            job = w.inflight[0] if w.inflight else None
            if job is not None and job.deadline is not None and now >= job.deadline and not w.timed_out:
                w.timed_out = True
                self._fail(job, JobTimeoutError(
                    f"job {job.desc} ran past its timeout of {job.timeout} s; "
                    f"its worker (pid {w.pid}) was killed and will be replaced"
                ))
                self._kill(w)
            if w.eof_at is not None and now >= w.eof_at + EXIT_STATUS_WAIT:
                self._finish_worker(w)  # the exit status never came (the fork helper died too)
        idle = not self._pending and not any(w.inflight for w in self._workers.values())
        if self._auto_quiesce and idle and now - self._last_activity >= self._quiesce_after:
            self._quiesced = True

    def _start_or_stop_workers(self) -> None:
        self._start_retry_at = None
        if self._quiesced:
            for w in self._workers.values():
                if not w.inflight and not w.quitting:
                    w.quitting = True
                    self._send_quit(w)
            return
        if self._start_failures >= MAX_START_FAILURES:
            error = WorkerStartError(
                f"{self._start_failures} workers in a row failed to start; last: {self._start_error}. "
                "Fix the cause (initializer, environment) and submit again."
            )
            while self._pending:
                self._fail(self._pending.popleft(), error)
            return
        live = sum(1 for w in self._workers.values() if not w.quitting)
        for _ in range(self.nprocs - live):
            try:
                self._start_worker()
            except Exception as e:
                self._start_failures += 1
                self._start_error = f"{type(e).__name__}: {e}"
                log.warning("shmpool could not start a worker: %s", self._start_error)
                # Nothing else may wake us (no worker, no reply): retry on a deadline, so the
                # queue either runs or fails after MAX_START_FAILURES tries, never waits forever.
                self._start_retry_at = time.monotonic() + START_RETRY_DELAY
                break

    def _start_worker(self) -> None:
        serial = next(self._serials)
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        request = response = None
        sem_names = (new_semaphore_name(), new_semaphore_name())
        try:
            request = Segment.create(self._ring_size + wire.CONTROL_BYTES, label="shmpool-request")
            response = Segment.create(self._ring_size, label="shmpool-response")
            endpoint = Endpoint(
                parent_sock,
                RingWriter(request, create_semaphore(sem_names[0]), self._ring_size),
                RingReader(response, create_semaphore(sem_names[1])),
            )
            w = _Worker(serial, endpoint, sem_names)
            fds = (child_sock.fileno(), request.fd, response.fd)
            if self.kind is SubprocKind.SPAWN:
                w.proc = spawn_worker(*fds)
                w.pid = w.proc.pid
            else:
                if self._helper is None:
                    self._helper = ForkHelper(self._preload)
                    self._selector.register(self._helper.sock, selectors.EVENT_READ, self._on_helper)
                self._helper.fork(serial, fds)
            boot = dict(self._boot, sys_path=list(sys.path), request_sem=sem_names[0], response_sem=sem_names[1])
            init = dump(boot, _PLAIN)
            if init.size > endpoint.oneoff_threshold:
                raise ValueError(f"worker set-up of {init.size} bytes does not fit a {self._ring_size}-byte ring")
            endpoint.send_payload(wire.MsgKind.INIT, 0, init)
        except BaseException:
            for name in sem_names:
                unlink_semaphore(name)
            for seg in (request, response):
                if seg is not None:
                    seg.close()
            parent_sock.close()
            raise
        finally:
            child_sock.close()
        parent_sock.setblocking(False)
        self._workers[serial] = w
        self._selector.register(parent_sock, selectors.EVENT_READ, functools.partial(self._on_worker, w))
        self._stats["workers_started"] += 1

    def _on_worker(self, w: _Worker) -> None:
        while True:
            try:
                got = recv_header(w.endpoint.sock)
            except BlockingIOError:
                return
            except (wire.WireError, OSError) as e:
                with self._lock:
                    self._protocol_error(w, f"bad message: {e}")
                return
            if got is None:
                self._on_worker_eof(w)
                return
            header, fds = got
            try:
                if header.kind == wire.MsgKind.READY:
                    self._chores = True
                    with self._lock:
                        w.ready = True
                        w.pid = header.offset
                        self._start_failures = 0
                        for name in w.sem_names:
                            unlink_semaphore(name)  # the worker did already; this covers a kill in between
                        self._place_pending(time.monotonic())
                elif header.kind in (wire.MsgKind.RESULT, wire.MsgKind.ERROR):
                    self._on_reply(w, header, fds)
                else:
                    raise wire.WireError(f"unexpected {header.kind.name} from a worker")
            except (wire.WireError, RingError, CodecError) as e:
                with self._lock:
                    self._protocol_error(w, str(e))
                return

    def _on_reply(self, w: _Worker, header: wire.Header, fds: list[int]) -> None:
        init_failed = header.job_id == 0 and header.kind == wire.MsgKind.ERROR and not w.ready
        with self._lock:
            if not init_failed:
                if not w.inflight or w.inflight[0].job_id != header.job_id:
                    raise wire.WireError(f"reply for job {header.job_id}, which that worker was not running")
                job = w.inflight.popleft()
                now = time.monotonic()
                self._last_activity = now
                if header.flags & wire.Flag.RECYCLE:
                    w.quitting = True  # over its memory cap: it exits now, a fresh one replaces it
                    self._chores = True
                # Running time, counted from when the job reached the head of its worker's queue.
                self._job_seconds += JOB_SECONDS_WEIGHT * (now - job.head_since - self._job_seconds)
                if w.inflight:
                    self._job_starts(w.inflight[0], now)
                # Hand the worker its next job before unpickling this result: the two overlap.
                self._place_pending(now)
        # The response ring is read only by this thread: no lock for the payload itself.
        payload = w.endpoint.open_payload(header, fds)
        try:
            if header.kind == wire.MsgKind.ERROR:
                error, _ = load(payload.view, _PLAIN, copy_buffers=True)
                name, details = error if isinstance(error, tuple) and len(error) == 2 else ("<unknown>", error)
                value, exc = None, self.remote_error_class(str(details), str(name))
            else:
                try:
                    value, _ = load(payload.view, self.pickler, copy_buffers=True)
                    exc = None
                except Exception:
                    value, exc = None, self.remote_error_class(
                        "the job's result could not be unpickled in the parent:\n" + traceback.format_exc()
                    )
        finally:
            payload.release()
        if init_failed:
            self._chores = True
            with self._lock:
                # Every start would fail the same way: fail the queue instead of looping.
                self._start_failures = MAX_START_FAILURES
                self._start_error = exc.details if isinstance(exc, SubprocException) else "initializer failed"
            return
        with self._lock:
            job.parts.release()
            self._stats["bytes_from_workers"] += header.length
            self._stats["copied_from_workers"] += 2 * header.length  # worker's write, our read
            if not job.future.done():
                self._stats["jobs_completed" if exc is None else "jobs_failed"] += 1
        _settle(job.future, value, exc)

    def _on_worker_eof(self, w: _Worker) -> None:
        self._chores = True
        self._selector.unregister(w.endpoint.sock)
        w.eof_at = time.monotonic()
        if w.proc is not None:
            # EOF means it is exiting; one that closed its socket but lingers is no use to us.
            w.exitcode = stop_process(w.proc, EXIT_STATUS_WAIT)
            w.status_known = True
        with self._lock:
            if w.status_known or self._helper is None:
                self._finish_worker(w)
            # else: a FORK worker; the helper's REAPED message (or a deadline) finishes it

    def _on_helper(self) -> None:
        self._chores = True
        helper = self._helper
        assert helper is not None
        while True:
            try:
                got = recv_header(helper.sock)
            except BlockingIOError:
                return
            except (wire.WireError, OSError) as e:
                log.warning("shmpool fork helper sent a bad message (%s); replacing it", e)
                got = None
            if got is None:
                self._on_helper_gone(helper)
                return
            header, _ = got
            with self._lock:
                w = self._workers.get(header.job_id)
                if w is None:
                    continue
                if header.kind == wire.MsgKind.FORKED:
                    w.pid = header.offset
                elif header.kind == wire.MsgKind.REAPED:
                    w.exitcode = os.waitstatus_to_exitcode(header.length)
                    w.status_known = True
                    if w.eof_at is not None:
                        self._finish_worker(w)

    def _on_helper_gone(self, helper: ForkHelper) -> None:
        # Its workers die with it (PDEATHSIG), and their exit statuses with it. A new helper
        # starts with the next worker.
        self._selector.unregister(helper.sock)
        helper.close(EXIT_STATUS_WAIT)
        with self._lock:
            self._helper = None
            for w in list(self._workers.values()):
                if w.proc is None and not w.status_known:
                    self._kill(w)
                    w.status_known = True  # as known as it will ever be: exitcode None
                    if w.eof_at is not None:
                        self._finish_worker(w)

    def _protocol_error(self, w: _Worker, why: str) -> None:
        self._chores = True
        log.error("shmpool worker pid %s broke the protocol (%s); killing it", w.pid, why)
        if w.inflight:
            job = w.inflight.popleft()
            self._fail(job, WorkerDiedError(w.pid or -1, None, f"job {job.desc} (protocol error: {why})"))
        self._kill(w)

    def _finish_worker(self, w: _Worker) -> None:
        """A worker is gone: fail the job it was running, put the rest back, free its rings."""
        if self._workers.pop(w.serial, None) is None:
            return
        if w.eof_at is None:
            self._selector.unregister(w.endpoint.sock)
        taken = self._taken_job(w)
        w.endpoint.close()
        for name in w.sem_names:
            unlink_semaphore(name)
        expected = w.quitting and w.exitcode == 0 and not w.timed_out
        if not w.ready and not expected:
            self._start_failures += 1
            self._start_error = f"worker pid {w.pid} ended ({describe_exit(w.exitcode)}) before it was ready"
        requeue = list(w.inflight)
        if not expected and w.ready and not w.timed_out:
            self._stats["workers_died"] += 1
            if requeue and requeue[0].job_id == taken:
                job = requeue.pop(0)
                exitcode = w.exitcode if w.status_known else None
                self._fail(job, WorkerDiedError(w.pid or -1, exitcode, f"job {job.desc}"))
        elif w.timed_out and requeue and requeue[0].future.done():
            requeue.pop(0)  # the job that timed out, already failed
        self._pending.extendleft(reversed(requeue))  # never started: run them elsewhere

    @staticmethod
    def _taken_job(w: _Worker) -> int:
        """Id of the job the worker last took off its socket (see wire.CONTROL_BYTES)."""
        ring = w.endpoint.outgoing
        assert ring.segment.view is not None
        return wire.TAKEN.unpack_from(ring.segment.view, ring.capacity)[0]

    def _send_quit(self, w: _Worker) -> None:
        try:
            w.endpoint.send_control(wire.MsgKind.QUIT)
        except OSError:
            pass  # already gone; EOF tells us

    def _teardown(self) -> None:
        """Staged stop: fail what is left, QUIT, close, then SIGTERM and SIGKILL what lingers."""
        closed = RuntimeError("SubprocPool closed")
        with self._lock:
            while self._pending:
                self._fail(self._pending.popleft(), closed)
            workers = list(self._workers.values())
            for w in workers:
                w.quitting = True
                if w.inflight:
                    # Its job's future is failed below; nobody waits for what it computes.
                    self._signal(w, signal.SIGTERM)
                    while w.inflight:
                        self._fail(w.inflight.popleft(), closed)
                else:
                    self._send_quit(w)
        self._flush()
        for w in workers:
            try:
                w.endpoint.close()  # EOF for a worker still busy in a job
            except OSError:
                pass
            for name in w.sem_names:
                unlink_semaphore(name)
        deadline = time.monotonic() + QUIT_GRACE
        for w in workers:
            if w.proc is not None:
                stop_process(w.proc, max(0.0, deadline - time.monotonic()), TERM_GRACE)
        if self._helper is not None:
            self._helper.close(QUIT_GRACE)
            self._helper = None
        self._selector.close()
        with self._lock:
            self._workers.clear()
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1
        _live_pools.discard(self)

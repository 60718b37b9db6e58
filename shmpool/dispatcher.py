"""The dispatcher thread: one wait over every event that can unblock work, then act on it.

It waits in one ``select`` on (and only on):

  - the wake-up pipe: a caller queued a job that needs it, or asked to quiesce, wake up or stop;
  - each worker's socket: READY, RESULT/ERROR (each also says its job's request region was
    freed first, see ring.py, so a reply is also the "ring space freed" event);
  - each worker's pidfd: the worker process exited, however it died and whoever else holds its
    socket (a grandchild a job forked, say);
  - the fork helper's socket (FORKED with the worker's pidfd, REAPED with its exit status) and
    the helper's pidfd;

with a timeout only when a deadline is pending: a job's timeout, a retiring worker's SIGKILL,
an exit status still to come, a worker start to retry, the idle quiesce. Nothing polls.

It alone starts processes (PDEATHSIG is tied to the thread that starts a child), reads
replies, resolves what dead workers held, and enforces deadlines. Every handler contains its
failures to the worker or job it was about: a fault there never stops the loop.
"""
from __future__ import annotations

import errno
import logging
import os
import select
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from . import wire
from .channel import FDS_DROPPED, Endpoint, recv_header, recv_headers
from .claims import JobClaims
from .codec import CodecError, dump, load
from .core import JOB_SECONDS_WEIGHT, STALL_SECONDS, PoolCore
from .futures import settle
from .errors import JobTimeoutError, SubprocException, WorkerDiedError, WorkerStartError, describe_exit
from .launch import ForkHelper, spawn_worker, stop_process
from .lifecycle import Job, Worker, WorkerState, move_worker
from .pickler import SubprocPickler
from .ring import RingReader, RingWriter
from .semaphores import SharedSemaphore
from .shm import Segment, SharedMemoryError, out_of_fds

log = logging.getLogger("shmpool.pool")

QUIT_GRACE = 2.0  # seconds a worker gets to exit after QUIT (idle) or SIGTERM (busy) at shutdown
KILL_WAIT = 1.0  # seconds for killed workers to be seen exiting at shutdown
EOF_GRACE = 1.0  # seconds a worker that closed its socket may linger before we SIGKILL it
QUIT_KILL_AFTER = 10.0  # seconds an idle worker told to QUIT (quiesce, recycle) may take to exit
STATUS_WAIT = 1.0  # seconds to wait for a FORK worker's exit status from the helper after its exit
# A job with others queued behind it that has run this long may be one whose reply its worker holds
# while it runs the next (holding.py): read the worker's journal (_peek_held).
HELD_PEEK_SECONDS = 0.02
MAX_START_FAILURES = 3  # starts failing in a row before the queue is failed (if no worker is live)
START_RETRY_DELAY = 0.5  # seconds before trying again to start a worker that could not be started
START_BACKOFF_MAX = 30.0  # with live workers, failing starts are retried at most this far apart
JOIN_LIMIT = 30.0  # seconds shutdown(wait=True) waits for the dispatcher's teardown
LONGEST_WAIT = 3600.0  # the most one select() waits for a deadline (epoll takes up to ~24.8 days)
_PLAIN = SubprocPickler()
_KNOWN_INFRA_ERRORS = (SharedMemoryError,)  # raised by the worker for us to raise as they are


class _ProtocolError(Exception):
    """A reply that is not one a worker following the protocol could send."""


class Dispatcher:
    def __init__(self, core: PoolCore, spawn: bool, ring_size: int, preload: tuple[str, ...], boot: dict[str, Any], pickler: SubprocPickler) -> None:
        self.core = core
        self._spawn = spawn
        self._ring_size = ring_size
        self._preload = preload
        self._boot = boot
        self._pickler = pickler
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_lock = threading.Lock()  # teardown closes the pipe under it: no write hits a reused fd
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        self._helper: ForkHelper | None = None
        self._serials = iter(range(1, 1 << 62))
        self._start_failures = 0  # in a row
        self._start_cause = ""
        self._start_retry_at: float | None = None
        self._chores = True  # check deadlines, worker count and the queue on the next round
        self.auto_quiesce_after: float | None = None  # quiesce=True: idle seconds before quiescing
        self.start_timeout: float | None = None  # seconds a starting worker gets to be READY (None: no limit)
        self._idle_quiesce_at: float | None = None
        self.all_exited = threading.Event()  # set once teardown has reaped every process
        core.wake = self.wake
        self.thread = threading.Thread(target=self._run, name="shmpool-dispatch", daemon=True)

    # ------------------------------------------------------------ any thread

    def wake(self) -> None:
        """Nudge the dispatcher. Never raises; safe after teardown."""
        with self._wake_lock:
            if self._wake_w < 0:
                return  # the dispatcher is gone
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:
                pass  # the pipe is full: a wake-up is pending already

    def reset_start_failures(self, *, unless_live: bool = False) -> None:
        """Under lock: a new job or wakeup() is worth another round of start attempts (a new
        job only when no worker is live: with one, the queue runs and starts back off)."""
        if unless_live and any(w.live for w in self.core.workers.values()):
            return
        if self._start_failures:
            self._start_failures = 0
            self._start_retry_at = None
            self.wake()

    @property
    def short_handed(self) -> bool:
        """Under lock: fewer workers than the pool's size (the dispatcher starts more)."""
        return len(self.core.workers) < self.core.nprocs

    @property
    def helper_pid(self) -> int | None:
        helper = self._helper
        return helper.pid if helper is not None else None

    # ------------------------------------------------------------ the loop

    def _run(self) -> None:
        core = self.core
        try:
            while not core.closing:
                # Chores that asked for another round (a failed start, say) run without waiting.
                events = self._selector.select(0 if self._chores else self._timeout())
                if not events:
                    self._chores = True  # a deadline came due
                for key, _ in events:
                    try:
                        key.data(key.fileobj)
                    except Exception:
                        log.exception("shmpool dispatcher: handling an event failed; going on")
                        self._chores = True
                    core.flush()
                # A plain reply needs nothing more (it placed the next job itself); skipping the
                # chores then keeps the GIL free for the caller waking up on its result.
                if not self._chores:
                    continue
                self._chores = False
                now = time.monotonic()
                self._peek_held(now)  # outside the lock: it reads replies
                with core.lock:
                    if core.closing:
                        break
                    self._expire(now)
                    self._top_up(now)
                    self._unstack_stalled(now)
                    core.place_pending(now, send_later=True)
                core.send_placed()
                core.flush()
        except BaseException:
            log.exception("shmpool dispatcher failed; failing every job")
        finally:
            with core.lock:
                core.closing = True
            self._teardown()

    def _timeout(self) -> float | None:
        core = self.core
        with core.lock:
            deadlines = []
            for w in core.workers.values():
                if w.inflight and w.inflight[0].deadline is not None:
                    deadlines.append(w.inflight[0].deadline)
                if len(w.inflight) >= 2 and w.peeked != w.inflight[0].job_id:
                    deadlines.append(w.inflight[0].head_since + HELD_PEEK_SECONDS)
                if (w.deferred or len(w.inflight) >= 2) and not w.stalled:
                    deadlines.append(w.inflight[0].head_since + STALL_SECONDS)
                if w.kill_at is not None and (w.pidfd >= 0 or w.proc is not None):
                    deadlines.append(w.kill_at)  # (a FORK worker not reported yet: FORKED wakes us)
                if w.status_by is not None:
                    deadlines.append(w.status_by)
                if w.start_by is not None and w.state is WorkerState.STARTING:
                    deadlines.append(w.start_by)
            if self._start_retry_at is not None:
                deadlines.append(self._start_retry_at)
            if self._idle_quiesce_at is not None:
                deadlines.append(self._idle_quiesce_at)
        spares_idle = core.spares.idle_deadline()
        if spares_idle is not None:
            deadlines.append(spares_idle)
        if not deadlines:
            return None
        # Capped: a deadline days away (a long job timeout) is more than select() can take.
        return min(max(0.0, min(deadlines) - time.monotonic()), LONGEST_WAIT)

    def _on_wake(self, _fd: object) -> None:
        self._chores = True
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    # ------------------------------------------------------------ chores, under lock

    def _expire(self, now: float) -> None:
        core = self.core
        for w in list(core.workers.values()):
            job = w.inflight[0] if w.inflight else None
            if job is not None and job.deadline is not None and now >= job.deadline:
                job.deadline = None
                core.resolve(w.inflight.popleft(), exc=JobTimeoutError(
                    f"job {job.desc} ran past its timeout of {job.timeout} s; "
                    f"its worker (pid {w.pid}) was killed and will be replaced"
                ))
                w.expected_exit = True
                self._kill(w, "a job ran past its timeout")
            if w.kill_at is not None and now >= w.kill_at and (w.pidfd >= 0 or w.proc is not None):
                w.kill_at = None
                self._signal(w, signal.SIGKILL)
            if w.status_by is not None and now >= w.status_by:
                self._finish(w)  # its exit status never came (the fork helper died too)
            if w.start_by is not None and now >= w.start_by and w.state is WorkerState.STARTING:
                # Stopped (SIGSTOP), or stuck before READY: the jobs that wait for it must not.
                w.expected_exit = True  # a failed start, counted here
                self._kill(w, "it did not become ready in time")  # (no longer live)
                self._start_failed(
                    f"worker pid {w.pid} did not become ready within {self.start_timeout:g} s "
                    f"(stopped, or stuck starting), and was killed"
                )
        spares_idle = core.spares.idle_deadline()
        if spares_idle is not None and now >= spares_idle:
            core.spares.clear()  # no big payload for a while: give the warm segments back
        # Auto-quiesce: idle for quiesce_after seconds.
        self._idle_quiesce_at = None
        if self.auto_quiesce_after is not None and not core.quiesced and core.workers:
            busy = core.pending or any(w.inflight for w in core.workers.values())
            if not busy:
                at = core.last_activity + self.auto_quiesce_after
                if now >= at:
                    core.quiesced = True
                else:
                    self._idle_quiesce_at = at

    def _unstack_stalled(self, now: float) -> None:
        """Under lock: short jobs stacked behind one that has run STALL_SECONDS are not left
        to wait for it while another worker could run them. Its worker takes no more; the
        stacked jobs it was never told of go back to the queue, and so do those it was told
        of but has not taken (withdrawn: claims.py)."""
        core = self.core
        for w in core.workers.values():
            if w.stalled or not w.inflight or now < w.inflight[0].head_since + STALL_SECONDS:
                continue
            w.stalled = True
            if any(o is not w and o.state is WorkerState.READY for o in core.workers.values()):
                core.take_back_unsent(w)  # (else nobody could run them sooner: they stay)
                core.withdraw_untaken(w)

    def _top_up(self, now: float) -> None:
        """Quiesce idle workers, or start workers up to the pool's size."""
        core = self.core
        if core.quiesced:
            core.spares.clear()
            for w in core.workers.values():
                if w.state is WorkerState.READY and not w.inflight:
                    self._quit(w, "the pool quiesced")
            return
        live = sum(1 for w in core.workers.values() if w.live)
        if self._start_retry_at is not None:
            if now < self._start_retry_at:
                return
            self._start_retry_at = None
        elif self._start_failures >= MAX_START_FAILURES:
            if live == 0:
                self._fail_queue_no_workers()  # nothing can run them; the next submit() tries again
            return
        for _ in range(core.nprocs - live):
            try:
                self._start_worker()
            except Exception as e:
                self._start_failed(_start_cause(e))
                log.warning("shmpool could not start a worker: %s", self._start_cause)
                break

    def _start_failed(self, cause: str) -> None:
        """Under lock. Nothing else may wake us after a failed start (no worker, no reply), so
        the next try is on a deadline: soon for the first few, then, while live workers carry
        the queue, ever later; with none live the queue fails (see _top_up)."""
        self._start_failures += 1
        self._start_cause = cause
        self._chores = True
        extra = self._start_failures - MAX_START_FAILURES
        if extra < 0:
            self._start_retry_at = time.monotonic() + START_RETRY_DELAY
        elif any(w.live for w in self.core.workers.values()):
            self._start_retry_at = time.monotonic() + min(START_BACKOFF_MAX, START_RETRY_DELAY * 2 ** (extra + 1))
        else:
            self._start_retry_at = None

    def _fail_queue_no_workers(self) -> None:
        core = self.core
        if not core.pending:
            return
        error = WorkerStartError(
            f"no worker could be started: {self._start_failures} starts failed in a row; last: "
            f"{self._start_cause}. The queued jobs are failed; the next submit() tries again."
        )
        while core.pending:
            core.resolve(core.pending.popleft(), exc=error)

    # ------------------------------------------------------------ starting, under lock

    def _start_worker(self) -> None:
        core = self.core
        serial = next(self._serials)
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        request = response = None
        w: Worker | None = None
        try:
            request = Segment.create(wire.request_segment_size(self._ring_size), label="shmpool-request")
            response = Segment.create(self._ring_size, label="shmpool-response")
            request_freed_at, response_freed_at = wire.freed_semaphore_offsets(self._ring_size)
            endpoint = Endpoint(
                parent_sock,
                RingWriter(request, SharedSemaphore.create(request, request_freed_at), self._ring_size),
                RingReader(response, SharedSemaphore.create(request, response_freed_at)),
                core.spares,
            )
            assert request.view is not None
            claims = JobClaims(
                request.view, self._ring_size, SharedSemaphore.create(request, wire.claim_semaphore_offset(self._ring_size), 1)
            )
            fds = (child_sock.fileno(), request.fd, response.fd)
            if self._spawn:
                w = Worker(serial, endpoint, spawn_worker(*fds))
                w.pidfd = os.pidfd_open(w.pid)  # type: ignore[arg-type]  # our unreaped child
            else:
                w = Worker(serial, endpoint, None)
                if self._helper is None:
                    self._start_helper()
                assert self._helper is not None
                self._helper.fork(serial, fds)
            w.claims = claims
            if self.start_timeout is not None:
                w.start_by = time.monotonic() + self.start_timeout
            boot = dict(self._boot, sys_path=list(sys.path))
            init = dump(boot, _PLAIN)
            if init.size > endpoint.oneoff_threshold:
                raise ValueError(f"worker set-up of {init.size} bytes does not fit a {self._ring_size}-byte ring")
            endpoint.send_payload(wire.MsgKind.INIT, wire.SETUP_JOB_ID, init, 0, 0.0, lambda: True)
        except BaseException:
            if w is not None and w.proc is not None:
                w.proc.kill()
                w.proc.wait()
            if w is not None and w.pidfd >= 0:
                os.close(w.pidfd)
            for seg in (request, response):
                if seg is not None:
                    seg.close()
            parent_sock.close()
            raise
        finally:
            child_sock.close()
        parent_sock.setblocking(False)
        core.workers[serial] = w
        self._selector.register(parent_sock, selectors.EVENT_READ, self._worker_handler(w))
        if w.pidfd >= 0:
            self._selector.register(w.pidfd, selectors.EVENT_READ, self._exit_handler(w))
        core.counts["workers_started"] += 1

    def _start_helper(self) -> None:
        helper = ForkHelper(self._preload)
        self._helper = helper
        self._selector.register(helper.sock, selectors.EVENT_READ, lambda _: self._on_helper(helper))
        self._selector.register(helper.pidfd, selectors.EVENT_READ, lambda _: self._on_helper_gone(helper))

    def _worker_handler(self, w: Worker) -> Callable[[object], None]:
        return lambda _: self._on_worker(w)

    def _exit_handler(self, w: Worker) -> Callable[[object], None]:
        return lambda _: self._on_exit(w)

    # ------------------------------------------------------------ worker messages

    def _on_worker(self, w: Worker, drain: bool = False) -> None:
        """Read the worker's next message, or with ``drain`` every message it has sent. Its
        faults cost it, never the loop. One at a time on a readiness event: the socket stays
        readable while more wait (epoll is level-triggered), and a read that finds nothing
        costs a syscall and an exception on every reply."""
        while w.socket_open:
            try:
                got = recv_headers(w.endpoint.sock)
            except BlockingIOError:
                return
            except (wire.WireError, OSError) as e:
                self._protocol_error(w, f"bad message: {e}")
                return
            if got is None:
                self._on_eof(w)
                return
            headers, fds = got
            try:
                self._on_headers(w, headers, fds)
            except Exception as e:  # WireError, RingError, CodecError, or worse: it is the worker's
                self._protocol_error(w, f"{type(e).__name__}: {e}")
                return
            if not drain:
                return

    def _on_headers(self, w: Worker, headers: list[wire.Header], fds: list[int]) -> None:
        """One message. Replies: take their jobs off the worker's queue and place its next jobs
        (one message for all of them) in one hold of the lock, then read the results, so the
        worker is busy meanwhile. Raises WireError when the worker broke the protocol, after
        resolving every job the message answered."""
        replies: list[tuple[wire.Header, list[int]]] = []
        for i, header in enumerate(headers):
            its_fds = fds if i == 0 else []
            if w.delivered_early and header.job_id in w.delivered_early:
                w.delivered_early.discard(header.job_id)  # read from its journal already (_peek_held)
                continue
            if header.kind in (wire.MsgKind.RESULT, wire.MsgKind.ERROR) and not (
                header.job_id == wire.SETUP_JOB_ID and w.state is WorkerState.STARTING
            ):
                replies.append((header, its_fds))
            else:
                self._on_message(w, header, its_fds)
        if not replies:
            return
        core = self.core
        taken: list[tuple[Job, wire.Header, list[int]]] = []
        broken: str | None = None
        with core.lock:
            now = time.monotonic()
            for header, its_fds in replies:
                if broken is None and w.inflight and w.inflight[0].job_id == header.job_id:
                    job = w.inflight.popleft()
                    self._job_done(w, job, header, now)
                    taken.append((job, header, its_fds))
                else:
                    broken = broken or f"reply for job {header.job_id}, which that worker was not running"
                    for fd in its_fds:
                        os.close(fd)
            core.place_pending(now, send_later=True, answered=w)
        core.send_placed()
        outcomes: list[tuple[Job, wire.Header, Any, BaseException | None]] = []
        for job, header, its_fds in taken:
            if broken is not None:  # after a bad region nothing behind it can be trusted
                for fd in its_fds:
                    os.close(fd)
                outcomes.append((job, header, None, WorkerDiedError(w.pid or -1, None, f"job {job.desc} (protocol error: {broken})")))
                continue
            value, exc = self._read_reply(w, job, header, its_fds)
            if isinstance(exc, _ProtocolError):
                broken = str(exc)
                exc = WorkerDiedError(w.pid or -1, None, f"job {job.desc} (protocol error: {broken})")
            outcomes.append((job, header, value, exc))
        settled: list[tuple[Future, Any, BaseException | None]] = []
        with core.lock:
            for job, header, value, exc in outcomes:
                if header.flags & wire.Flag.IN_JOB_SEGMENT:
                    core.counts["warm_segments"] += 1
                core.counts["bytes_from_workers"] += header.length
                # The worker's write and our read; a dumps()/loads()-only pickler adds its bytes each side.
                core.counts["copied_from_workers"] += (2 if core.zero_copy or header.kind == wire.MsgKind.ERROR else 4) * header.length
                core.resolve(job, value, exc, into=settled)
        for future, value, exc in settled:
            settle(future, value, exc)
        if self.auto_quiesce_after is not None:
            self._chores = True  # the idle clock restarts: its deadline needs computing
        if broken is not None:
            raise wire.WireError(broken)

    def _read_reply(self, w: Worker, job: Job, header: wire.Header, fds: list[int]) -> tuple[Any, BaseException | None]:
        """The result (or error) a reply carries. Never raises: a result we cannot map fails
        alone (SharedMemoryError); a malformed reply comes back as a _ProtocolError. The job's
        one-off segment, and one the result came in, are kept warm (spares.py) once read."""
        if fds is FDS_DROPPED:  # its memfd never reached us (our fd limit, not the worker's fault)
            return None, SharedMemoryError(f"the result of job {job.desc} could not be received: {out_of_fds()}")
        placement = job.placement
        lent = placement.oneoff if placement is not None else None
        try:
            payload = w.endpoint.open_payload(header, fds, lent=lent, keep_segment=True)
        except SharedMemoryError as e:
            # We cannot map this one result (address space, memory): it fails alone; the
            # worker freed its side already and goes on.
            return None, SharedMemoryError(f"the result of job {job.desc} could not be mapped: {e}")
        except Exception as e:
            return None, _ProtocolError(f"{type(e).__name__}: {e}")
        # The response ring is read only by this thread: no lock for the payload itself.
        try:
            value, exc = self._decode(header, payload)
        except BaseException as e:
            value, exc = None, _ProtocolError(f"job {job.job_id}'s reply could not be read: {e}")
        finally:
            payload.release()
        if header.flags & wire.Flag.UNSETTLED and (lent is None or header.flags & (wire.Flag.KEPT | wire.Flag.IN_JOB_SEGMENT | wire.Flag.ONEOFF)):
            value, exc = None, _ProtocolError(f"job {job.job_id}'s reply says UNSETTLED: only the reply in the ring to a job in a segment of its own may")
        # Segments go back to the spares only from a worker that kept to the protocol: one that
        # broke it is killed, but could write into them until it is gone.
        trusted = not isinstance(exc, _ProtocolError)
        spares = self.core.spares
        if lent is not None:
            assert placement is not None
            job.placement = placement._replace(oneoff=None)
            if trusted and header.flags & wire.Flag.UNSETTLED:
                with self.core.lock:
                    w.settling[job.job_id] = lent  # spares or closed on its SETTLED (_on_settled)
            elif trusted and not header.flags & wire.Flag.KEPT:
                spares.give(lent)
            else:
                lent.close()  # KEPT: the job's views in the worker still see it
        if payload.segment is not None:  # the worker's own; read with copies, nothing here views it
            if trusted:
                spares.give(payload.segment)
            else:
                payload.segment.close()
        return value, exc

    def _on_message(self, w: Worker, header: wire.Header, fds: list[int]) -> None:
        core = self.core
        kind = header.kind
        if kind == wire.MsgKind.ERROR and header.job_id == wire.SETUP_JOB_ID and w.state is WorkerState.STARTING:
            self._on_init_failed(w, header, fds)
            return
        if fds:
            for fd in fds:
                os.close(fd)
            raise wire.WireError(f"{kind.name} arrived with fds")
        if kind == wire.MsgKind.SETTLED:
            self._on_settled(w, header)
        elif kind == wire.MsgKind.READY and w.state is WorkerState.STARTING:
            self._chores = True
            with core.lock:
                if w.proc is not None and header.offset != w.pid:
                    raise wire.WireError(f"READY from pid {header.offset}, but worker pid is {w.pid}")
                move_worker(w, WorkerState.READY)
                w.was_ready = True
                w.pid = w.pid or header.offset
                self._start_failures = 0
                core.place_pending(time.monotonic(), send_later=True)
            core.send_placed()
        else:
            raise wire.WireError(f"unexpected {kind.name} from a worker in state {w.state.name}")

    def _on_settled(self, w: Worker, header: wire.Header) -> None:
        """The worker's final word on a segment it answered UNSETTLED: warm it, or close it."""
        if header.offset or header.length or header.flags & ~wire.Flag.KEPT:
            raise wire.WireError(f"malformed SETTLED for job {header.job_id}")
        with self.core.lock:
            segment = w.settling.pop(header.job_id, None)
        if segment is None:
            raise wire.WireError(f"SETTLED for job {header.job_id}, which left no segment with that worker")
        if header.flags & wire.Flag.KEPT:
            segment.close()  # the job's views in the worker still see it
        else:
            self.core.spares.give(segment)

    def _job_done(self, w: Worker, job: Job, header: wire.Header, now: float) -> None:
        """Bookkeeping when ``w`` answers ``job``, under lock."""
        core = self.core
        core.last_activity = now
        w.stalled = False
        if header.flags & wire.Flag.RECYCLE:
            self._retire_after_reply(w)
        # Running time, counted from when the job reached the head of its worker's queue.
        core.job_seconds += JOB_SECONDS_WEIGHT * (now - job.head_since - core.job_seconds)
        if w.inflight:
            core.job_starts(w.inflight[0], now)

    def _retire_after_reply(self, w: Worker) -> None:
        # Over its memory cap, or holding a region it could not take back: it exits now by
        # itself; a fresh one replaces it. Jobs stacked behind are put back when it exits.
        w.expected_exit = True
        self.core.retire(w, "it asked to be recycled", time.monotonic() + QUIT_KILL_AFTER)
        self._chores = True

    def _decode(self, header: wire.Header, payload: Any) -> tuple[Any, BaseException | None]:
        if header.kind == wire.MsgKind.ERROR:
            error, _ = load(payload.view, _PLAIN, copy_buffers=True)
            if not (isinstance(error, tuple) and len(error) == 3):
                raise CodecError(f"an ERROR payload that is not (name, details, error): {type(error).__name__}")
            name, details, infra = error
            if isinstance(infra, _KNOWN_INFRA_ERRORS):
                return None, infra
            return None, self.core.remote_error_class(str(details), str(name))
        try:
            value, _ = load(payload.view, self._pickler, copy_buffers=True)
        except BaseException:  # SystemExit, KeyboardInterrupt from a __reduce__: this job's failure
            return None, self.core.remote_error_class(
                "the job's result could not be unpickled in the parent:\n" + traceback.format_exc()
            )
        return value, None

    def _on_init_failed(self, w: Worker, header: wire.Header, fds: list[int]) -> None:
        payload = w.endpoint.open_payload(header, fds)
        try:
            _, exc = self._decode(header, payload)
        finally:
            payload.release()
        details = exc.details if isinstance(exc, SubprocException) else str(exc)
        with self.core.lock:
            # Every start would fail the same way: fail the queue (if no worker is live) instead of looping.
            w.expected_exit = True
            self.core.retire(w, "its initializer failed", time.monotonic() + EOF_GRACE)
            self._start_failures = MAX_START_FAILURES - 1
            self._start_failed(f"the worker initializer raised:\n{details}")
        self._chores = True

    def _on_eof(self, w: Worker) -> None:
        """The worker closed its socket: it is exiting. Its pidfd says when it is gone; one that
        lingers is killed."""
        self._close_socket(w)
        with self.core.lock:
            self.core.retire(w, "it closed its socket", time.monotonic() + EOF_GRACE)
        self._chores = True

    def _close_socket(self, w: Worker) -> None:
        if w.socket_open:
            w.socket_open = False
            self._selector.unregister(w.endpoint.sock)

    def _protocol_error(self, w: Worker, why: str) -> None:
        log.error("shmpool worker pid %s broke the protocol (%s); killing it", w.pid, why)
        self._close_socket(w)
        with self.core.lock:
            self._kill(w, f"protocol error: {why}")
        self._chores = True

    # ------------------------------------------------------------ exits

    def _on_exit(self, w: Worker) -> None:
        """``w``'s pidfd fired: the process is gone. Read what it sent before dying, then settle
        its jobs (at once if its exit status is known, else when the helper reports it)."""
        self._selector.unregister(w.pidfd)
        os.close(w.pidfd)
        w.pidfd = -1
        self._on_worker(w, drain=True)  # a reply sent just before exiting is still in the socket
        self._close_socket(w)
        self._recover_held(w)
        with self.core.lock:
            if w.proc is not None:
                w.exitcode = w.proc.wait()  # exited: returns at once
                w.status_known = True
            move_worker(w, WorkerState.EXITED)
            if w.status_known or self._helper is None:
                self._finish(w)
            else:
                w.status_by = time.monotonic() + STATUS_WAIT
        self._chores = True

    def _recover_held(self, w: Worker) -> None:
        """Replies the dead ``w`` wrote but held back (holding.py): read them as if sent."""
        self._deliver_held(w, alive=False)

    def _peek_held(self, now: float) -> None:
        """A job that has run past HELD_PEEK_SECONDS (or its timeout) with jobs queued behind it
        may be one whose reply the worker holds back while it runs the next: read those replies
        from the journal now, once per such job, so they are not late and the job running is
        the one timed."""
        core = self.core
        with core.lock:
            due = []
            for w in core.workers.values():
                if len(w.inflight) < 2 or not w.socket_open:
                    continue
                head = w.inflight[0]
                late = w.peeked != head.job_id and now >= head.head_since + HELD_PEEK_SECONDS
                if late or (head.deadline is not None and now >= head.deadline):
                    w.peeked = head.job_id
                    due.append(w)
        for w in due:
            self._deliver_held(w, alive=True)

    def _deliver_held(self, w: Worker, *, alive: bool) -> None:
        """Read the replies in ``w``'s journal that answer its next jobs, in order. A live worker
        still sends their headers later: those are skipped (``w.delivered_early``)."""
        ring = w.endpoint.outgoing
        assert ring.segment.view is not None
        try:
            headers = wire.read_held(ring.segment.view, ring.capacity, alive=alive)
        except wire.WireError as e:
            headers = None
            log.warning("shmpool worker pid %s left a malformed journal (%s)", w.pid, e)
        if not headers:
            return
        with self.core.lock:
            inflight = [job.job_id for job in w.inflight]
        answered = [h for h in headers if h.kind in (wire.MsgKind.RESULT, wire.MsgKind.ERROR) and h.job_id in inflight]
        if not answered or [h.job_id for h in answered] != inflight[: len(answered)]:
            return
        try:
            self._on_headers(w, answered, [])
        except Exception as e:  # its journal is no more trusted than its socket
            if alive:
                self._protocol_error(w, f"journaled reply: {e}")
            return
        if alive:
            w.delivered_early.update(h.job_id for h in answered)

    def _finish(self, w: Worker) -> None:
        """Under lock: ``w`` is gone. Fail the job it was running, put back the jobs it never
        took, close its rings."""
        core = self.core
        if core.workers.pop(w.serial, None) is None:
            return
        if w.state is not WorkerState.EXITED:
            move_worker(w, WorkerState.EXITED)
        move_worker(w, WorkerState.GONE)
        w.status_by = w.kill_at = None
        ring = w.endpoint.outgoing
        assert ring.segment.view is not None
        taken = wire.read_taken(ring.segment.view, ring.capacity)
        # The worker takes its jobs in order: every job up to the one it took last was started
        # (run, or answered in a reply it never sent) and fails; the rest never began.
        ids = [job.job_id for job in w.inflight]
        cut = ids.index(taken) + 1 if taken in ids else 0
        running, untaken = list(w.inflight)[:cut], list(w.inflight)[cut:]
        w.inflight.clear()
        w.deferred = []  # headers of jobs it will never see: they are put back below
        exitcode = w.exitcode if w.status_known else None
        for job in running:
            why = f"job {job.desc}" + (f" ({w.retire_reason})" if w.retire_reason.startswith("protocol") else "")
            core.resolve(job, exc=WorkerDiedError(w.pid or -1, exitcode, why))
        core.requeue(w, untaken)
        if w.was_ready and not w.expected_exit:
            core.counts["workers_died"] += 1
        w.endpoint.close()
        w.close_settling()
        if not w.was_ready and not w.expected_exit:
            self._start_failed(f"worker pid {w.pid} ended ({describe_exit(exitcode)}) before it was ready")
        self._chores = True

    # ------------------------------------------------------------ fork helper

    def _on_helper(self, helper: ForkHelper) -> None:
        self._chores = True
        core = self.core
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
            header, fds = got
            with core.lock:
                w = core.workers.get(header.job_id)
                if header.kind == wire.MsgKind.FORKED and len(fds) == 1 and w is not None and w.pidfd < 0:
                    w.pid, w.pidfd = header.offset, fds[0]
                    self._selector.register(w.pidfd, selectors.EVENT_READ, self._exit_handler(w))
                    if w.kill_at is not None:
                        self._chores = True  # a kill was asked for before we could send it
                    continue
                for fd in fds:
                    os.close(fd)
                if header.kind == wire.MsgKind.REAPED and w is not None:
                    w.exitcode = os.waitstatus_to_exitcode(header.length)
                    w.status_known = True
                    if w.state is WorkerState.EXITED:
                        self._finish(w)

    def _on_helper_gone(self, helper: ForkHelper) -> None:
        # Its workers die with it (PDEATHSIG): their pidfds fire, but their exit statuses are
        # lost. A worker it never reported (no pidfd yet) is finished here. A new helper
        # starts with the next worker.
        if self._helper is not helper:
            return
        self._helper = None
        self._selector.unregister(helper.sock)
        self._selector.unregister(helper.pidfd)
        helper.close(0.0)
        with self.core.lock:
            for w in list(self.core.workers.values()):
                if w.proc is not None:
                    continue
                w.status_known = True  # as known as it will ever be: exitcode None
                if w.pidfd < 0:
                    self._close_socket(w)
                    self._finish(w)
                elif w.state is WorkerState.EXITED:
                    self._finish(w)
        self._chores = True

    # ------------------------------------------------------------ signals, under lock

    def _quit(self, w: Worker, why: str) -> None:
        w.expected_exit = True
        self.core.retire(w, why, time.monotonic() + QUIT_KILL_AFTER)
        try:
            w.endpoint.send_control(wire.MsgKind.QUIT)
        except OSError:
            pass  # already gone; its pidfd tells us

    def _kill(self, w: Worker, why: str) -> None:
        self.core.retire(w, why)
        self._signal(w, signal.SIGKILL)

    @staticmethod
    def _signal(w: Worker, signum: int) -> None:
        try:
            if w.pidfd >= 0:
                signal.pidfd_send_signal(w.pidfd, signum)
            elif w.proc is not None:
                w.proc.send_signal(signum)
            else:
                w.kill_at = time.monotonic()  # FORK worker not reported yet: kill once it is
        except OSError:
            pass  # already gone

    # ------------------------------------------------------------ teardown

    def _teardown(self) -> None:
        """Staged stop: fail what is left, QUIT, close, then SIGTERM and SIGKILL what lingers."""
        core = self.core
        closed = RuntimeError("SubprocPool closed")
        with core.lock:
            while core.pending:
                core.resolve(core.pending.popleft(), exc=closed)
            workers = list(core.workers.values())
            for w in workers:
                if w.inflight:
                    # Its job's future is failed below; nobody waits for what it computes.
                    self._signal(w, signal.SIGTERM)
                    while w.inflight:
                        core.resolve(w.inflight.popleft(), exc=closed)
                elif w.state is WorkerState.READY:
                    try:
                        w.endpoint.send_control(wire.MsgKind.QUIT)
                    except OSError:
                        pass
        core.flush()
        for w in workers:
            try:
                w.endpoint.close()  # EOF for a worker still busy in a job
            except OSError:
                pass
            w.close_settling()
        # Every worker at once, through its pidfd: each stage waits once for all of them. An
        # idle one had QUIT, a busy one SIGTERM (above): what lingers past QUIT_GRACE is killed.
        tracked = [w.pidfd for w in workers if w.pidfd >= 0]
        _await_exits(tracked, time.monotonic() + QUIT_GRACE)
        for w in workers:
            if w.pidfd >= 0:
                self._signal(w, signal.SIGKILL)  # (a no-op for one that exited)
        _await_exits(tracked, time.monotonic() + KILL_WAIT)
        for w in workers:
            if w.proc is not None:  # SPAWN: ours to reap (FORK: the helper reaps them)
                stop_process(w.proc, KILL_WAIT)
        for w in workers:
            if w.pidfd >= 0:
                os.close(w.pidfd)
                w.pidfd = -1
        if self._helper is not None:
            self._helper.close(QUIT_GRACE)
            self._helper = None
        self._selector.close()
        core.spares.clear()
        with core.lock:
            core.workers.clear()
        with self._wake_lock:
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_w = -1
        self.all_exited.set()


def _await_exits(pidfds: list[int], deadline: float) -> None:
    """Wait until every process behind ``pidfds`` has exited, or ``deadline`` passes."""
    poller = select.poll()
    waiting = set(pidfds)
    for fd in waiting:
        poller.register(fd, select.POLLIN)
    while waiting:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        for fd, _ in poller.poll(left * 1000):
            poller.unregister(fd)
            waiting.discard(fd)


def _start_cause(e: BaseException) -> str:
    """The reason a worker could not be started, with the fix where one is known."""
    text = f"{type(e).__name__}: {e}"
    if isinstance(e, OSError) and e.errno == errno.EMFILE:
        return text + " (the process is out of file descriptors: raise the limit, `ulimit -n`, or use fewer workers)"
    if isinstance(e, OSError) and e.errno in (errno.ENOMEM, errno.EAGAIN):
        return text + " (out of memory or processes: free some, or use fewer workers)"
    return text

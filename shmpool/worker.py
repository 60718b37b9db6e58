"""The worker loop: receive a job header, unpickle from shared memory, run, reply.

A worker is either a fresh interpreter (SPAWN, ``python -c 'from shmpool.worker import
spawn_main; spawn_main()'``) or a fork of the fork helper (FORK). Either way it holds one
socket and two memfd rings, all inherited as fds (the rings' semaphores are in the request
segment's control block); everything else arrives in its INIT payload through the request
ring. It exits on EOF (the parent is gone), on QUIT, or after a reply flagged RECYCLE.

One job, in order (the parent relies on each step's place):
  1. mark the job taken in the request segment's control block, unless the parent withdrew it
     (claims.py: then its region is freed unread and it gets no reply);
  2. map its payload: big out-of-band arguments through a mapping of the job's own
     (shm.RegionMapping), so views the job keeps can never see a later job's bytes;
  3. unpickle; free the request region at once unless the job uses it in place;
  4. run and pickle the result;
  5. free the request region if still held (ring.py: *before* the reply's header, so the
     header tells the parent there is room again);
  6. write the result into the response ring; one too big for it goes back in the job's own
     one-off segment when the job came in one (grown if short: its pages are warm), else in a
     fresh one. A job that kept views of its one-off segment gets KEPT on its reply instead,
     and the parent never writes into that segment again;
  7. send the header;
  8. a job in a one-off segment whose views outlived a young-generation collection was
     answered UNSETTLED: run the full collection now, off the caller's path, and send SETTLED
     (KEPT or not). Until then the parent keeps that segment out of its spares.

Headers arrive in batches when the parent stacks short jobs. A short job's reply header is
then held while more jobs are queued here, and all held headers go out as one message when
the queue runs dry, a batch fills, a job is about to start after they have waited HOLD_SECONDS,
or a payload needs ring space the parent has yet to free. They are journaled (holding.py): the
parent reads them itself when the worker dies, or when the job behind them runs long.
"""
from __future__ import annotations

import collections
import ctypes
import os
import time
import pickle
import select
import signal
import socket
import sys
import traceback
from typing import Any


from . import wire
from .channel import FDS_DROPPED, Endpoint, Payload, recv_header, recv_headers
from .claims import JobClaims
from .codec import IN_PLACE_MIN_BYTES, Parts, dump, load, oob_bytes_of
from .errors import RESULT_NOT_PICKLED, PayloadTooLargeError, describe_error, unpickle_context
from .holding import HOLD_SECONDS, HeldReplies
from .pickler import SubprocPickler
from .ring import RingReader, RingWriter
from .semaphores import SharedSemaphore
from .shm import RegionMapping, Segment, SharedMemoryError, out_of_fds

_PR_SET_PDEATHSIG = 1
RESULT_SPACE_WAIT_STEP = 1.0  # seconds between parent-alive checks while the response ring is full
_PLAIN = SubprocPickler()  # errors travel with plain pickle, whatever the pool's pickler is

Error = tuple[str, str, Exception | None]  # (class name, traceback text, shmpool error to raise as is)


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL us when our parent dies, so a worker busy in a long job does
    not outlive it (an idle one would see EOF anyway). Exit now if it is already gone."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: EOF on the socket still ends an idle worker
    if os.getppid() != parent_pid:
        os._exit(0)


def _describe(exc: BaseException, context: str = "", infra: Exception | None = None) -> Error:
    """``describe_error`` plus the shmpool error the parent raises as it is, if any."""
    return (*describe_error(exc, context), infra)


def run_initializer(boot: dict[str, Any]) -> SubprocPickler:
    """The pool's pickler, once the pool's initializer (if any) has run; raises what it raises."""
    pickler: SubprocPickler = pickle.loads(boot["pickler"])
    if boot["initializer"] is not None:
        fn, args = pickler.loads(boot["initializer"])
        fn(*args)
    return pickler


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Worker:
    def __init__(self, sock: socket.socket, request: Segment, response: Segment, parent_pid: int) -> None:
        self.sock = sock
        self.request = request
        self.response = response
        self.parent_pid = parent_pid
        self.request_capacity = wire.request_ring_capacity(request.size)
        self.endpoint: Endpoint | None = None
        self.pickler: SubprocPickler = _PLAIN
        self.max_payload: int | None = None
        self.memory_cap: int | None = None
        self._backlog: collections.deque[tuple[wire.Header, list[int]]] = collections.deque()
        self.held: HeldReplies | None = None  # reply headers written but not yet sent
        self.claims: JobClaims | None = None  # taking jobs, or finding them withdrawn
        self._job_started = 0.0
        self._eof = False  # the parent closed its end (seen while looking ahead)
        self._unsettled: list[tuple[int, Segment]] = []  # answered UNSETTLED: (job id, segment still mapped)
        self.pid = os.getpid()
        self._socket_poll = select.poll()
        self._socket_poll.register(sock, select.POLLIN)

    def _parent_alive(self) -> bool:
        return os.getppid() == self.parent_pid

    def _init(self) -> bool:
        """Read INIT, reach the semaphores, run the initializer. False if the parent went away."""
        got = recv_header(self.sock)
        if got is None:
            return False
        header, fds = got
        if header.kind != wire.MsgKind.INIT:
            raise wire.WireError(f"expected INIT first, got {header.kind.name}")
        # INIT is read before the ring is set up on our side: bounds-check it by hand.
        if fds or header.offset != 0 or not 0 < header.length <= self.request_capacity:
            raise wire.WireError("malformed INIT header")
        assert self.request.view is not None
        boot, _ = load(self.request.view[: header.length], _PLAIN, copy_buffers=True)
        assert isinstance(boot, dict)
        sys.path[:] = boot["sys_path"]
        request_freed_at, response_freed_at = wire.freed_semaphore_offsets(self.request_capacity)
        request_freed = SharedSemaphore.attach(self.request, request_freed_at)
        response_freed = SharedSemaphore.attach(self.request, response_freed_at)
        incoming = RingReader(self.request, request_freed, self.request_capacity)
        incoming.view(header.offset, header.length)  # account for INIT's region, then free it
        incoming.free()
        self.endpoint = Endpoint(self.sock, RingWriter(self.response, response_freed), incoming)
        self.held = HeldReplies(self.endpoint, self.request.view, self.request_capacity)
        claim_lock = SharedSemaphore.attach(self.request, wire.claim_semaphore_offset(self.request_capacity))
        self.claims = JobClaims(self.request.view, self.request_capacity, claim_lock)
        self.max_payload = boot["max_payload"]
        self.memory_cap = boot["memory_cap"]
        for key, value in boot["environ"].items():
            os.environ[key] = value
        try:
            self.pickler = run_initializer(boot)
        except BaseException as e:
            self._reply(wire.SETUP_JOB_ID, _describe(e, "worker initializer failed"), None)
            return False
        self.endpoint.send_control(wire.MsgKind.READY, 0, os.getpid())
        return True

    def _open_job(self, header: wire.Header, fds: list[int]) -> tuple[Payload, bool]:
        """The job's payload, and whether its out-of-band arguments are to be used in place.
        Raises SharedMemoryError when it cannot be mapped (the region is freed first)."""
        assert self.endpoint is not None
        if header.flags & wire.Flag.ONEOFF:
            # Its views may stay after the job: the reply then says KEPT (see _reply).
            payload = self.endpoint.open_payload(header, fds, keep_segment=True)
            return payload, oob_bytes_of(payload.view) >= IN_PLACE_MIN_BYTES
        payload = self.endpoint.open_payload(header, fds)
        if oob_bytes_of(payload.view) < IN_PLACE_MIN_BYTES:
            return payload, False
        incoming = self.endpoint.incoming
        try:
            mapping = RegionMapping(self.request.fd, header.offset % incoming.capacity, header.length)
        except SharedMemoryError:
            payload.release()
            raise
        payload.view.release()
        assert mapping.view is not None
        return Payload(mapping.view, incoming, None, mapping), True

    def _run_job(self, header: wire.Header, fds: list[int]) -> int:
        """Run one job and reply. Returns the flags sent (RECYCLE means: exit now)."""
        # Mark it taken before anything can go wrong with it: if we die from here on, the parent
        # fails this job; if we die before, it runs the job on another worker.
        assert self.request.view is not None
        held = self.held
        assert held is not None
        if held.headers and held.overdue():
            held.send()
        self._job_started = time.monotonic()
        assert self.claims is not None
        claimed = self.claims.take(header, RESULT_SPACE_WAIT_STEP, self._parent_alive)
        if not claimed:
            if claimed is None:
                return int(wire.Flag.RECYCLE)  # the parent is gone
            self._drop_withdrawn(header, fds)
            return 0
        try:
            if fds is FDS_DROPPED:  # a job closed fds it did not own, or lowered the limit
                raise SharedMemoryError(f"worker pid {os.getpid()} could not receive the job's memfd: {out_of_fds()}")
            payload, in_place = self._open_job(header, fds)
        except SharedMemoryError as e:
            cant_map = _describe(e, "the job's arguments could not be mapped in the worker", SharedMemoryError(str(e)))
            return self._reply(header.job_id, cant_map, None)
        # Each error is described inside its except block but answered after it: the exception's
        # traceback holds the job's frames, and through them views into its mapping.
        error: Error | None = None
        try:
            job, uses_region = load(payload.view, self.pickler, copy_buffers=not in_place)
        except BaseException as e:
            error = _describe(e, unpickle_context(e))
        if error is not None:
            return self._reply(header.job_id, error, payload)
        if not uses_region:
            payload.release()  # free the request slot before running: the parent can reuse it
        result: Any = None
        try:
            fn, args, kwargs = job  # type: ignore[misc]
            del job
            result = fn(*args, **kwargs)
        except BaseException as e:
            _exit_if_forked_by_the_job(self.pid, e)
            error = _describe(e)
        else:
            _exit_if_forked_by_the_job(self.pid, None)
        fn = args = kwargs = job = None  # drop the job's references (views into its mapping) now
        if error is not None:
            return self._reply(header.job_id, error, payload)
        try:
            parts = dump(result, self.pickler)
        except BaseException as e:
            error = _describe(e, RESULT_NOT_PICKLED)
        result = None
        if error is not None:
            return self._reply(header.job_id, error, payload)
        if self.max_payload is not None and parts.size > self.max_payload:
            too_large = PayloadTooLargeError("the job's result", parts.size, self.max_payload)
            return self._reply(header.job_id, _describe(too_large), payload)
        return self._reply(header.job_id, parts, payload)

    def _drop_withdrawn(self, header: wire.Header, fds: list[int]) -> None:
        """A job the parent withdrew (it runs elsewhere): free its region unread, in ring order."""
        assert self.endpoint is not None
        for fd in fds:
            os.close(fd)
        if fds:
            raise wire.WireError(f"job {header.job_id} in the ring arrived with fds")
        incoming = self.endpoint.incoming
        incoming.view(header.offset, header.length).release()  # checks it is the next region
        incoming.free()

    def _reply(self, job_id: int, answer: Parts | Error, request: Payload | None) -> int:
        """Write ``answer`` (a result, or an error the parent raises) into the response ring,
        free the job's request region, then send the header. Returns the flags sent."""
        assert self.endpoint is not None
        kind = wire.MsgKind.RESULT
        if isinstance(answer, tuple):
            kind, answer = wire.MsgKind.ERROR, dump(answer, _PLAIN)
        flags = 0
        if self.memory_cap is not None and rss_bytes() > self.memory_cap:
            flags |= wire.Flag.RECYCLE
        # The job's memory is taken back after the answer is written (the answer may still view
        # it: an in-place argument returned), unless the answer is to go into the job's own
        # one-off segment: then first, and only if nothing views it any more.
        lent: Segment | None = None
        if request is not None and request.segment is not None and answer.size > self.endpoint.oneoff_threshold:
            taken, lent = _take_back(request)
            flags |= taken
            request = None
        try:
            placement = self._stage(answer, lent)
        except SharedMemoryError as e:
            error = _describe(e, "the job's result could not be placed in shared memory")
            kind, answer = wire.MsgKind.ERROR, dump(error, _PLAIN)
            placement = self._stage(answer)
        finally:
            if lent is not None:
                lent.close()  # written into or not needed: the parent holds its own fd
        if placement is None:
            return int(wire.Flag.RECYCLE)  # the parent is gone
        answer.release()  # drop the result object before the parent copies it
        del answer
        if request is not None:
            taken, unused = _take_back(request, settle_later=not flags & wire.Flag.RECYCLE)
            flags |= taken
            if taken & wire.Flag.UNSETTLED:
                assert unused is not None
                self._unsettled.append((job_id, unused))
            elif unused is not None:
                unused.close()
        held = self.held
        assert held is not None
        hold = (
            placement.oneoff is None
            and not flags
            and self._more_queued()
            and len(held.headers) < wire.MAX_BATCH - 1
            and time.monotonic() - self._job_started < HOLD_SECONDS
        )
        try:
            held.announce(kind, job_id, placement, flags, hold)
        finally:
            if placement.oneoff is not None:
                placement.oneoff.close()  # the fd in flight keeps the memory alive for the reader
        if self._unsettled:
            self._settle()
        return flags

    def _settle(self) -> None:
        """Give the final word on segments answered UNSETTLED, now the reply is out: a full
        collection, then SETTLED with KEPT when the job's views outlived it."""
        assert self.endpoint is not None
        while self._unsettled:
            job_id, segment = self._unsettled.pop(0)
            clean = segment.unmap()
            segment.close()  # kept views keep the mapping (not the fd) alive
            assert self.held is not None
            self.held.send_control(wire.MsgKind.SETTLED, job_id, flags=0 if clean else int(wire.Flag.KEPT))

    def _more_queued(self) -> bool:
        """Whether another job is waiting for us: in hand, or in the socket already."""
        if not self._backlog and not self._eof:
            if not self._socket_poll.poll(0):
                return False  # (asked without a read that fails: an exception per job costs more)
            try:
                got = recv_headers(self.sock, block=False)
            except BlockingIOError:
                return False
            if got is None:
                self._eof = True
                return False
            headers, fds = got
            self._backlog.extend((h, fds if i == 0 else []) for i, h in enumerate(headers))
        return bool(self._backlog)

    def _stage(self, answer: Parts, lent: Segment | None = None) -> Any:
        """Place a reply in the response ring (or, too big for it, in ``lent`` or a segment of
        its own); if the ring is full, send the held headers first: the parent frees space only
        for replies it has heard of."""
        assert self.endpoint is not None
        placement = self.endpoint.stage(answer, lent=lent)
        if placement is None:
            assert self.held is not None
            self.held.send()
            placement = self.endpoint.stage(answer, RESULT_SPACE_WAIT_STEP, self._parent_alive)
        return placement

    def _next(self) -> tuple[wire.Header, list[int]] | None:
        """The next header to act on; None when the parent is gone. Held replies go out
        before we block."""
        if not self._backlog:
            if self._eof:
                return None
            got = None
            held = self.held
            assert held is not None
            if held.headers:
                try:
                    got = recv_headers(self.sock, block=False)
                except BlockingIOError:
                    held.send()  # nothing more queued: the parent hears of them now
            if got is None and not held.headers:
                got = recv_headers(self.sock)
            elif got is None:
                return self._next()
            if got is None:
                return None
            headers, fds = got
            self._backlog.extend((h, fds if i == 0 else []) for i, h in enumerate(headers))
        return self._backlog.popleft()

    def serve(self) -> None:
        if not self._init():
            return
        try:
            while True:
                got = self._next()
                if got is None:
                    return  # the parent closed its end: it is gone or shutting down
                header, fds = got
                if header.kind == wire.MsgKind.QUIT:
                    return
                if header.kind != wire.MsgKind.JOB or header.job_id == wire.SETUP_JOB_ID:
                    raise wire.WireError(f"unexpected {header.kind.name} (job {header.job_id}) from the parent")
                if self._run_job(header, fds) & wire.Flag.RECYCLE:
                    return
        finally:
            if self.held is not None:
                self.held.send()


def _exit_if_forked_by_the_job(worker_pid: int, raised: BaseException | None) -> None:
    """A child the job forked that returned or raised out of the job function: it exits here,
    as a ``multiprocessing`` child does after its target. Carrying on would answer the job (and
    take the next ones) from a process the pool does not own, over the worker's socket."""
    if os.getpid() == worker_pid:
        return
    code = 0
    if isinstance(raised, SystemExit):
        code = raised.code if isinstance(raised.code, int) else (0 if raised.code is None else 1)
    elif raised is not None:
        code = 1
    _flush_and_exit(code)


def _flush_and_exit(code: int) -> None:
    """Leave the process now (no atexit, no finalizers: they belong to the process forked
    from), with what it printed flushed."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


def _take_back(request: Payload, *, settle_later: bool = False) -> tuple[int, Segment | None]:
    """Free a job's request memory. Returns the reply's flags for it (KEPT: the job kept views
    of its one-off segment; RECYCLE: of a ring region we could not take back) and the one-off
    segment, unmapped, when nothing views it any more (the caller reuses or closes it).
    ``settle_later``: for a one-off segment, run only the cheap collections now; if views
    outlive them, answer UNSETTLED with the segment still mapped (see Worker._settle)."""
    provisional = settle_later and request.segment is not None
    clean = request.release(full_collection=not provisional)
    segment, request.segment = request.segment, None
    if segment is None:
        return (0 if clean else int(wire.Flag.RECYCLE)), None
    if clean:
        return 0, segment
    if provisional:
        return int(wire.Flag.UNSETTLED), segment
    segment.close()  # the job's views keep our mapping alive; the parent must not reuse it
    return int(wire.Flag.KEPT), None


def run(sock_fd: int, request_fd: int, response_fd: int, parent_pid: int) -> None:
    """Entry for both kinds, once the fds are in place. Never returns."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which stops us
    code = 0
    try:
        for fd in (sock_fd, request_fd, response_fd):
            os.set_inheritable(fd, False)  # keep them out of processes a job starts
        sock = socket.socket(fileno=sock_fd)
        Worker(sock, Segment.attach(request_fd), Segment.attach(response_fd), parent_pid).serve()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the parent closed our socket (shutdown, or it died): nobody wants the reply
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        _flush_and_exit(code)


def spawn_main() -> None:
    sock_fd, request_fd, response_fd, parent_pid = (int(a) for a in sys.argv[1:5])
    run(sock_fd, request_fd, response_fd, parent_pid)

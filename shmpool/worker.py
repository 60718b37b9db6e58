"""The worker loop: receive a job header, unpickle from shared memory, run, reply.

A worker is either a fresh interpreter (SPAWN, ``python -c 'from shmpool.worker import
spawn_main; spawn_main()'``) or a fork of the fork helper (FORK). Either way it holds one
socket and two memfd rings, all inherited as fds; everything else, the semaphore names
included, arrives in its INIT payload through the request ring. It exits on EOF (the parent
is gone), on QUIT, or after a reply flagged RECYCLE (over its memory cap).
"""
from __future__ import annotations

import ctypes
import os
import pickle
import signal
import socket
import sys
import traceback
from typing import Any

import posix_ipc

from . import wire
from .channel import Endpoint, Payload, recv_header
from .codec import dump, load
from .errors import PayloadTooLargeError
from .pickler import SubprocPickler
from .ring import RingReader, RingWriter
from .shm import Segment, SharedMemoryError, open_and_unlink_semaphore

_PR_SET_PDEATHSIG = 1
RESULT_SPACE_WAIT_STEP = 1.0  # seconds between parent-alive checks while the response ring is full
_PLAIN = SubprocPickler()  # errors travel with plain pickle, whatever the pool's pickler is


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


def _describe(exc: BaseException, context: str = "") -> tuple[str, str]:
    """``(class name, traceback text led by context)`` of ``exc``. Call it inside the except block
    and drop ``exc``: its traceback holds the job's frames, and through them views into its slot."""
    details = "".join(traceback.format_exception(exc))
    return type(exc).__name__, f"{context}:\n{details}" if context else details


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Worker:
    def __init__(self, sock: socket.socket, request: Segment, response: Segment, parent_pid: int) -> None:
        self.sock = sock
        self.request = request
        self.response = response
        self.parent_pid = parent_pid
        if request.size <= wire.CONTROL_BYTES:
            raise wire.WireError(f"request segment of {request.size} bytes has no room for a ring")
        self.request_capacity = request.size - wire.CONTROL_BYTES
        assert request.view is not None
        self.request_control = request.view[self.request_capacity :]
        self.endpoint: Endpoint | None = None
        self.pickler: SubprocPickler = _PLAIN
        self.max_payload: int | None = None
        self.memory_cap: int | None = None

    def _parent_alive(self) -> bool:
        return os.getppid() == self.parent_pid

    def _init(self) -> bool:
        """Read INIT, open the semaphores, run the initializer. False if the parent went away."""
        got = recv_header(self.sock)
        if got is None:
            return False
        header, fds = got
        if header.kind != wire.MsgKind.INIT:
            raise wire.WireError(f"expected INIT first, got {header.kind.name}")
        # INIT is read before the semaphores exist on our side: bounds-check it by hand.
        if fds or header.offset != 0 or not 0 < header.length <= self.request_capacity:
            raise wire.WireError("malformed INIT header")
        assert self.request.view is not None
        boot, _ = load(self.request.view[: header.length], _PLAIN, copy_buffers=True)
        assert isinstance(boot, dict)
        sys.path[:] = boot["sys_path"]
        try:
            request_freed = open_and_unlink_semaphore(boot["request_sem"])
            response_freed = open_and_unlink_semaphore(boot["response_sem"])
        except posix_ipc.ExistentialError:
            return False  # the pool shut down while we were starting, and removed them

        incoming = RingReader(self.request, request_freed, self.request_capacity)
        incoming.view(header.offset, header.length)  # account for INIT's region, then free it
        incoming.free()
        self.endpoint = Endpoint(self.sock, RingWriter(self.response, response_freed), incoming)
        self.max_payload = boot["max_payload"]
        self.memory_cap = boot["memory_cap"]
        for key, value in boot["environ"].items():
            os.environ[key] = value
        try:
            self.pickler = pickle.loads(boot["pickler"])
            if boot["initializer"] is not None:
                fn, args = self.pickler.loads(boot["initializer"])
                fn(*args)
        except BaseException as e:
            self._reply_error(0, _describe(e, "worker initializer failed"))
            return False
        self.endpoint.send_control(wire.MsgKind.READY, 0, os.getpid())
        return True

    def _reply_error(self, job_id: int, error: tuple[str, str], flags: int = 0) -> None:
        """Send ``(exception name, traceback text)``: the parent raises SubprocException from it."""
        assert self.endpoint is not None
        self.endpoint.send_payload(
            wire.MsgKind.ERROR, job_id, dump(error, _PLAIN), flags, RESULT_SPACE_WAIT_STEP, self._parent_alive
        )

    def _run_job(self, header: wire.Header, fds: list[int]) -> int:
        """Run one job and reply. Returns the flags sent (RECYCLE means: exit now)."""
        assert self.endpoint is not None
        # Mark it taken before anything can go wrong with it: if we die from here on, the parent
        # fails this job; if we die before, it runs the job on another worker.
        wire.TAKEN.pack_into(self.request_control, 0, header.job_id)
        payload = self.endpoint.open_payload(header, fds)
        try:
            return self._run_and_reply(header.job_id, payload)
        finally:
            payload.release()

    def _run_and_reply(self, job_id: int, payload: Payload) -> int:
        assert self.endpoint is not None
        try:
            (fn, args, kwargs), uses_region = load(payload.view, self.pickler, copy_buffers=False)
        except BaseException as e:
            payload.release()
            self._reply_error(job_id, _describe(e, "job could not be unpickled in the worker"))
            return 0
        if not uses_region:
            payload.release()  # free the request slot before running: the parent can reuse it
        # Else out-of-band arguments are views into the slot, and so may the result be (a job
        # that returns its array argument): the slot is freed once the reply is out.
        try:
            result: Any = fn(*args, **kwargs)
            failure = None
        except BaseException as e:
            result, failure = None, _describe(e)
        del fn, args, kwargs
        flags = 0
        if self.memory_cap is not None and _rss_bytes() > self.memory_cap:
            flags = int(wire.Flag.RECYCLE)
        if failure is not None:
            self._reply_error(job_id, failure, flags)
            return flags
        try:
            parts = dump(result, self.pickler)
        except BaseException as e:
            self._reply_error(job_id, _describe(e, "result could not be pickled"), flags)
            return flags
        del result
        if self.max_payload is not None and parts.size > self.max_payload:
            too_large = PayloadTooLargeError("the job's result", parts.size, self.max_payload)
            self._reply_error(job_id, _describe(too_large), flags)
            return flags
        try:
            self.endpoint.send_payload(
                wire.MsgKind.RESULT, job_id, parts, flags, RESULT_SPACE_WAIT_STEP, self._parent_alive, release=True
            )
        except SharedMemoryError as e:
            self._reply_error(job_id, _describe(e, "the job's result could not be placed in shared memory"), flags)
        return flags

    def serve(self) -> None:
        if not self._init():
            return
        while True:
            got = recv_header(self.sock)
            if got is None:
                return  # the parent closed its end: it is gone or shutting down
            header, fds = got
            if header.kind == wire.MsgKind.QUIT:
                return
            if header.kind != wire.MsgKind.JOB:
                raise wire.WireError(f"unexpected {header.kind.name} from the parent")
            if self._run_job(header, fds) & wire.Flag.RECYCLE:
                return


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
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def spawn_main() -> None:
    sock_fd, request_fd, response_fd, parent_pid = (int(a) for a in sys.argv[1:5])
    run(sock_fd, request_fd, response_fd, parent_pid)

"""Process-shared POSIX semaphores that live inside a segment: no name, nothing in /dev/shm.

Each ring's ``freed`` semaphore is a ``sem_t`` in the control block of its worker's request
segment (``wire.REQUEST_FREED_AT``, ``wire.RESPONSE_FREED_AT``), set up by the parent with
``sem_init(pshared=1)`` before the worker can see the segment. Both processes map that memfd, so
both reach it, and it dies with the segment: a SIGKILL of anything leaves no name behind (named
semaphores were files in /dev/shm from the parent's create until the starting worker unlinked
them). glibc's ``sem_post``/``sem_trywait``/``sem_getvalue`` are atomics on the shared page and a
wait that must sleep is a futex on it; they are called through ctypes, which releases the GIL
around each call.

A semaphore is only an address into its segment's mapping: the ring that owns it uses it while
the segment is mapped (the endpoint closes its segments only once it is done with the rings),
and every call checks that the mapping is still there.
"""
from __future__ import annotations

import ctypes
import errno
import os
import time

from .shm import Segment

SLOT_BYTES = 32  # sizeof(sem_t) on 64-bit glibc (16 on 32-bit): the room each one is given


class SemaphoreTimeout(Exception):
    """``acquire`` found no unit before its timeout (or a signal cut the wait short)."""


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


_libc = ctypes.CDLL(None, use_errno=True)
_sem_init = _libc.sem_init
_sem_init.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_uint)
_sem_post = _libc.sem_post
_sem_post.argtypes = (ctypes.c_void_p,)
_sem_trywait = _libc.sem_trywait
_sem_trywait.argtypes = (ctypes.c_void_p,)
_sem_getvalue = _libc.sem_getvalue
_sem_getvalue.argtypes = (ctypes.c_void_p, ctypes.POINTER(ctypes.c_int))
try:  # glibc >= 2.30: a deadline on the monotonic clock
    _sem_clockwait = _libc.sem_clockwait
    _sem_clockwait.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(_Timespec))
    _CLOCK = time.CLOCK_MONOTONIC
except AttributeError:
    _sem_clockwait = None
    _CLOCK = time.CLOCK_REALTIME
    _sem_timedwait = _libc.sem_timedwait
    _sem_timedwait.argtypes = (ctypes.c_void_p, ctypes.POINTER(_Timespec))

_GIVE_UP = (errno.EAGAIN, errno.ETIMEDOUT, errno.EINTR)


def _fail(call: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{call}: {os.strerror(err)}")


class SharedSemaphore:
    """The semaphore at ``offset`` in ``segment`` (mapped): made there with ``create``,
    reached from the other process with ``attach``."""

    __slots__ = ("_segment", "_addr")

    def __init__(self, segment: Segment, offset: int) -> None:
        view = segment.view
        if view is None or not 0 <= offset <= view.nbytes - SLOT_BYTES or offset % 8:
            raise ValueError(f"no room for a semaphore at {offset} of a {segment.size}-byte segment")
        with view[offset : offset + SLOT_BYTES] as slot:
            holder = ctypes.c_char.from_buffer(slot)  # only for the address: dropped at once
            self._addr = ctypes.addressof(holder)
            del holder
        self._segment = segment

    @classmethod
    def create(cls, segment: Segment, offset: int, value: int = 0) -> "SharedSemaphore":
        sem = cls(segment, offset)
        if _sem_init(sem._addr, 1, value) != 0:
            raise _fail("sem_init")
        return sem

    @classmethod
    def attach(cls, segment: Segment, offset: int) -> "SharedSemaphore":
        """The other side's: the parent's ``create`` made it before the worker got the segment."""
        return cls(segment, offset)

    def _live(self) -> int:
        if self._segment.view is None:
            raise ValueError("the semaphore's segment is closed")
        return self._addr

    def release(self) -> None:
        if _sem_post(self._live()) != 0:
            raise _fail("sem_post")

    def acquire(self, timeout: float) -> None:
        """Take one unit, waiting up to ``timeout`` seconds (0: not at all); SemaphoreTimeout
        when none came."""
        addr = self._live()
        if timeout <= 0:
            if _sem_trywait(addr) == 0:
                return
        else:
            at = time.clock_gettime(_CLOCK) + timeout
            deadline = _Timespec(int(at), int((at % 1) * 1e9))
            if _sem_clockwait is not None:
                if _sem_clockwait(addr, _CLOCK, ctypes.byref(deadline)) == 0:
                    return
            elif _sem_timedwait(addr, ctypes.byref(deadline)) == 0:
                return
        if ctypes.get_errno() in _GIVE_UP:
            raise SemaphoreTimeout
        raise _fail("sem_wait")

    @property
    def value(self) -> int:
        count = ctypes.c_int()
        if _sem_getvalue(self._live(), ctypes.byref(count)) != 0:
            raise _fail("sem_getvalue")
        return count.value

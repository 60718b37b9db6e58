"""Taking a job, or withdrawing it: each job sent to a worker is one or the other, never both.

The parent sends a busy worker's next jobs ahead (core.SENT_AHEAD), so that it finds them waiting.
When the job it runs turns out long (core.STALL_SECONDS), the jobs sent behind it would wait for
it, forever if it never ends, while another worker could run them. The parent withdraws them:

  * worker, before it touches a job in the ring: under the claim lock, if the job's ring position
    is below the parent's ``withdrawn`` mark it is withdrawn (its region is freed unread, no reply);
    else its id is stored as ``taken``.
  * parent, to withdraw: under the same lock, it reads ``taken`` and sets ``withdrawn`` to the
    ring's head. The jobs behind the one taken were not taken, and now never will be: they go
    back to the queue (core.PoolCore.withdraw_untaken), their bytes read back from the ring.

Jobs in a one-off segment (offset 0, not a ring position) are never withdrawn. The lock is a
process-shared semaphore in the request segment's control block (wire.CLAIM_AT), held for a few
instructions by either side; a parent that cannot have it at once (the worker is stopped or
died holding it) leaves the jobs where they are, as before this existed.
"""
from __future__ import annotations

from collections.abc import Callable

from . import wire
from .semaphores import SemaphoreTimeout, SharedSemaphore

# How long the parent waits for the lock. The worker holds it for microseconds; a longer wait
# means it was stopped or killed holding it, and the dispatcher must not wait on that.
WITHDRAW_LOCK_WAIT = 0.005


class JobClaims:
    """The claim lock and marks of one worker's request segment (``request`` is its view)."""

    __slots__ = ("_request", "_capacity", "_lock")

    def __init__(self, request: memoryview, ring_capacity: int, lock: SharedSemaphore) -> None:
        self._request = request
        self._capacity = ring_capacity
        self._lock = lock

    def take(self, header: wire.Header, wait_step: float, still_wanted: Callable[[], bool]) -> bool | None:
        """Worker: claim the job ``header`` announces. True: it is ours to run (and marked
        taken); False: the parent withdrew it; None: the parent is gone (``still_wanted`` said
        no while we waited for the lock)."""
        lock = self._lock
        try:
            lock.acquire(0)
        except SemaphoreTimeout:
            while True:
                try:
                    lock.acquire(wait_step)
                    break
                except SemaphoreTimeout:
                    if not still_wanted():
                        return None
        try:
            in_ring = not header.flags & (wire.Flag.ONEOFF | wire.Flag.IN_JOB_SEGMENT)
            if in_ring and header.offset < wire.read_withdrawn(self._request, self._capacity):
                return False
            wire.mark_taken(self._request, self._capacity, header.job_id)
            return True
        finally:
            lock.release()

    def withdraw_below(self, position: int) -> int | None:
        """Parent: withdraw every job in the ring below ``position`` that the worker has not
        taken. Returns the id of the job it took last, or None when the lock could not be had
        (nothing is withdrawn then)."""
        try:
            self._lock.acquire(WITHDRAW_LOCK_WAIT)
        except SemaphoreTimeout:
            return None
        try:
            wire.mark_withdrawn(self._request, self._capacity, position)
            return wire.read_taken(self._request, self._capacity)
        finally:
            self._lock.release()

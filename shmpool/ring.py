"""A single-producer, single-consumer byte ring in a memfd, with a POSIX semaphore for space
(process-shared, in the worker's request segment: semaphores.py).

Invariants (one ring per direction per worker, so each side has exactly one writer):
  * Only the producer moves ``head``; it hands out contiguous regions in order, skipping the
    tail end of the buffer when a region would wrap. Positions are monotonically increasing byte
    counts; the physical offset is ``position % capacity``.
  * The consumer frees regions strictly in the order it received them, by posting ``freed`` once
    per region. That post is the only thing the consumer ever writes: there is no shared control
    word, no lock, nothing a dying process can leave half-updated. A consumer killed mid-read
    simply never posts; its rings die with it (each worker has its own).
  * The producer learns what was freed by draining ``freed``; each unit pops the oldest
    outstanding region, so ``tail`` is the end of that region (padding included).
  * When nothing is outstanding the next region of REWIND_BYTES or more starts again at
    physical offset 0: the front of the buffer stays faulted in and hot in cache, instead of
    every payload walking onto fresh pages until the ring wraps.

Who wakes a producer that found the ring full (nothing here ever polls):
  * Request ring (parent -> worker). The parent never blocks on it: a job that does not fit
    waits in the pool's queue. The worker frees every job's region *before* it sends the
    header that answers the job (RESULT or ERROR), so each freed region is followed by a
    message on the worker's socket, which wakes the dispatcher to retry; a worker that dies
    instead wakes it through its pidfd. Any free the parent has not been told of yet is found
    by ``try_reserve`` draining the semaphore.
  * Response ring (worker -> parent). The worker blocks in ``reserve`` on the semaphore
    itself: the parent frees each reply's region as soon as it has read it, which posts. The
    wait is cut into steps only to notice a parent that died.
"""
from __future__ import annotations

import collections
from collections.abc import Callable

from .semaphores import SemaphoreTimeout, SharedSemaphore
from .shm import Segment

# A writer learns of freed regions when it must: when a region does not fit without them, when
# it is big enough that rewinding to the warm front pays (small ones may walk on), and every
# so many regions, to keep its list of outstanding ones short.
REWIND_BYTES = 64 << 10
COLLECT_EVERY = 64


class RingError(RuntimeError):
    """The peer broke the ring protocol (a region out of order or out of bounds)."""


def _capacity(segment: Segment, capacity: int | None) -> int:
    if capacity is None:
        return segment.size
    if not 0 < capacity <= segment.size:
        raise ValueError(f"ring capacity {capacity} does not fit a {segment.size}-byte segment")
    return capacity


class RingWriter:
    def __init__(self, segment: Segment, freed: SharedSemaphore, capacity: int | None = None) -> None:
        """A ring over the first ``capacity`` bytes of ``segment`` (all of it by default)."""
        assert segment.view is not None
        self.segment = segment
        self.capacity = _capacity(segment, capacity)
        self.freed = freed
        self.head = 0
        self.tail = 0
        self._outstanding: collections.deque[int] = collections.deque()  # region ends, FIFO

    def _collect(self) -> None:
        # Read the count first: a failed try-acquire costs an exception, and this runs for
        # every region handed out.
        posted = self.freed.value
        for _ in range(min(posted, len(self._outstanding))):
            try:
                self.freed.acquire(0)
            except SemaphoreTimeout:
                return
            self.tail = self._outstanding.popleft()

    def fits(self, size: int) -> bool:
        return 0 < size <= self.capacity

    def try_reserve(self, size: int) -> int | None:
        """Reserve ``size`` contiguous bytes; return their position, or None if full right now."""
        if not self.fits(size):
            raise ValueError(f"region of {size} bytes does not fit a ring of {self.capacity}")
        if size >= REWIND_BYTES or len(self._outstanding) >= COLLECT_EVERY or not self._room_for(size):
            self._collect()
        pos = self.head % self.capacity
        if not self._outstanding:
            pad = (self.capacity - pos) % self.capacity  # empty: rewind to the warm front
            self.tail = self.head + pad
        else:
            pad = self.capacity - pos if pos + size > self.capacity else 0
        start = self.head + pad
        if start + size - self.tail > self.capacity:
            return None
        self.head = start + size
        self._outstanding.append(self.head)
        return start

    def _room_for(self, size: int) -> bool:
        """Whether ``size`` fits after what is outstanding as we last knew it (without asking
        the semaphore, which releases the GIL and costs more than a small copy)."""
        pos = self.head % self.capacity
        pad = self.capacity - pos if pos + size > self.capacity else 0
        return self.head + pad + size - self.tail <= self.capacity

    def unreserve(self, start: int) -> None:
        """Take back the newest region, reserved at ``start`` and never announced (its writer
        was interrupted, or the job was taken back before its header went out): the ring is as
        if it had never been handed out. Repeatable, newest first."""
        if not self._outstanding or self._outstanding[-1] != self.head:
            raise RingError("only the newest region can be taken back")
        before = self._outstanding[-2] if len(self._outstanding) >= 2 else self.tail
        if not before <= start < self.head:
            raise RingError("only the newest region can be taken back")
        self._outstanding.pop()
        self.head = start

    def reserve(self, size: int, wait_step: float, still_wanted: Callable[[], bool]) -> int | None:
        """Block until ``size`` bytes are free. Wakes every ``wait_step`` seconds to ask
        ``still_wanted()``, so a dead peer cannot hold us forever; None if it says no."""
        while True:
            start = self.try_reserve(size)
            if start is not None:
                return start
            try:
                self.freed.acquire(wait_step)
            except SemaphoreTimeout:
                if not still_wanted():
                    return None
                continue
            self.tail = self._outstanding.popleft()

    def view(self, start: int, size: int) -> memoryview:
        pos = start % self.capacity
        assert self.segment.view is not None
        return self.segment.view[pos : pos + size]

    @property
    def idle(self) -> bool:
        self._collect()
        return not self._outstanding


class RingReader:
    def __init__(self, segment: Segment, freed: SharedSemaphore, capacity: int | None = None) -> None:
        assert segment.view is not None
        self.segment = segment
        self.capacity = _capacity(segment, capacity)
        self.freed = freed
        self._last_end = 0  # end of the newest region received
        self._unfreed: collections.deque[int] = collections.deque()  # starts of regions not yet freed, FIFO

    def view(self, start: int, size: int) -> memoryview:
        """The region a header names, after checking it is the next one the producer could
        have handed out: in order, inside the buffer, never overlapping an unfreed region."""
        pos = start % self.capacity
        floor = self._unfreed[0] if self._unfreed else start  # where unfreed data begins
        if (
            size <= 0
            or size > self.capacity
            or start < self._last_end
            or start - self._last_end >= self.capacity
            or pos + size > self.capacity
            or start + size - floor > self.capacity
        ):
            raise RingError(
                f"region {start}+{size} is not a valid next region of a {self.capacity}-byte ring "
                f"(last end {self._last_end}, oldest unfreed at {floor})"
            )
        self._last_end = start + size
        self._unfreed.append(start)
        assert self.segment.view is not None
        return self.segment.view[pos : pos + size]

    def free(self) -> None:
        """Give the oldest region received back to the producer."""
        self._unfreed.popleft()
        self.freed.release()

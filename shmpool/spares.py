"""Warm segments for payloads too big for a ring, kept between jobs.

A payload over the ring goes in a segment of its own. A fresh memfd costs the kernel zeroing
and mapping every page on first touch: on a VM that is 0.5-1 GB/s, against 6-9 GB/s writing
pages already touched. So a one-off segment is not thrown away after its job: the worker writes
a big result back into the job's own segment when it fits (or grows it), and the parent keeps
what comes back here for the next big payload. A grown segment keeps its warm pages.

Bounded three ways, because memory held for speed must never cost a later allocation:
  - at most ``limit`` bytes are kept (the oldest go first);
  - nothing is kept while the system is short of memory (MemAvailable under a floor), and
    ``create`` gives everything back and tries once more when a new segment cannot be had;
  - ``clear()`` gives everything back: the pool calls it on quiesce, after ``IDLE_SECONDS``
    without a big payload, and on shutdown.

Only the parent keeps spares; a worker returns the one it was lent with its reply.
"""
from __future__ import annotations

import threading
import time

from .shm import Segment, SharedMemoryError, mem_available, mem_total

IDLE_SECONDS = 10.0  # a spare unused this long is given back
MIN_BYTES = 1 << 20  # smaller segments are not worth keeping: their pages are few
SLACK = 4  # a spare more than this many times the payload is not lent for it (its pages stay idle)


def default_limit() -> int:
    """A quarter of the machine's memory: room for the frozen weights of a big model."""
    total = mem_total()
    return total // 4 if total > 0 else 1 << 30


class SpareSegments:
    """Segments no process is using, ready to be written again. Thread-safe."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = default_limit() if limit is None else limit
        self._lock = threading.Lock()
        self._kept: list[Segment] = []  # oldest first
        self._last_used = 0.0
        self.reused = 0  # payloads written into a kept segment instead of a fresh one

    @property
    def kept_bytes(self) -> int:
        with self._lock:
            return sum(s.size for s in self._kept)

    def idle_deadline(self) -> float | None:
        """When the kept segments are given back if nothing uses them; None when none are kept."""
        with self._lock:
            return self._last_used + IDLE_SECONDS if self._kept else None

    def create(self, size: int, label: str, *, mapped: bool = True) -> Segment:
        """A segment of at least ``size`` bytes: a kept one when one fits (grown if need be,
        mapped, its pages warm), else a new one, with every page allocated and mapped if
        ``mapped``, else neither (to be filled through the file: ``channel.fill``). Raises
        SharedMemoryError when none can be had even after giving every kept one back."""
        segment = self._take(size)
        if segment is not None:
            try:
                segment.ensure(size)
                return segment
            except SharedMemoryError:
                segment.close()
        try:
            return Segment.create(size, reserve=mapped, label=label, mapped=mapped)
        except SharedMemoryError:
            if not self.clear():
                raise
        return Segment.create(size, reserve=mapped, label=label, mapped=mapped)

    def _take(self, size: int) -> Segment | None:
        with self._lock:
            self._last_used = time.monotonic()
            fits = [s for s in self._kept if size <= s.size <= SLACK * size]
            if fits:
                best = min(fits, key=lambda s: s.size)
            elif self._kept and max(s.size for s in self._kept) < size:
                best = max(self._kept, key=lambda s: s.size)  # grown to fit: its pages stay warm
            else:
                return None
            self._kept.remove(best)
            self.reused += 1
            return best

    def give(self, segment: Segment) -> None:
        """Keep ``segment`` (no process may be using it any more) if the bounds allow, else close it."""
        size = segment.size
        if size < MIN_BYTES or size > self.limit or segment.fd < 0 or _memory_short():
            segment.close()
            return
        with self._lock:
            self._last_used = time.monotonic()
            self._kept.append(segment)
            dropped = []
            while sum(s.size for s in self._kept) > self.limit:
                dropped.append(self._kept.pop(0))
        for old in dropped:
            old.close()

    def clear(self) -> int:
        """Give every kept segment back; returns the bytes freed."""
        with self._lock:
            kept, self._kept = self._kept, []
        for segment in kept:
            segment.close()
        return sum(s.size for s in kept)


def _memory_short() -> bool:
    """Whether the system has under an eighth of its memory left (what is kept is counted as used)."""
    total, available = mem_total(), mem_available()
    if total <= 0 or available < 0:
        return False
    return available < total // 8

"""The ring on its own, with a real memfd and a real process-shared POSIX semaphore, in one
process; and that semaphore between two processes."""
import os
import time
from collections.abc import Iterator

import pytest

from shmpool.ring import RingError, RingReader, RingWriter
from shmpool.semaphores import SLOT_BYTES, SemaphoreTimeout, SharedSemaphore
from shmpool.shm import Segment

CAPACITY = 1 << 12


@pytest.fixture
def ring() -> Iterator[tuple[RingWriter, RingReader]]:
    segment = Segment.create(CAPACITY + SLOT_BYTES)  # the ring, then its semaphore
    sem = SharedSemaphore.create(segment, CAPACITY)
    try:
        yield RingWriter(segment, sem, CAPACITY), RingReader(segment, sem, CAPACITY)
    finally:
        segment.close()


def test_regions_are_handed_out_in_order_and_freed_fifo(ring) -> None:
    writer, reader = ring
    a = writer.try_reserve(1000)
    b = writer.try_reserve(1000)
    assert (a, b) == (0, 1000)
    writer.view(a, 3)[:] = b"abc"
    assert bytes(reader.view(a, 1000)[:3]) == b"abc"
    reader.view(b, 1000)
    assert writer.try_reserve(3000) is None  # 2000 used of 4096: no room for 3000
    reader.free()
    reader.free()
    assert writer.try_reserve(3000) == CAPACITY  # empty again: the next lap, physical offset 0


def test_wraps_around_the_end_with_padding(ring) -> None:
    writer, reader = ring
    first = writer.try_reserve(3000)
    reader.view(first, 3000)
    second = writer.try_reserve(500)
    reader.view(second, 500)
    reader.free()  # first freed; second still outstanding at 3000..3500
    third = writer.try_reserve(1000)  # does not fit before the end: skips to the next lap
    assert third == CAPACITY
    assert reader.view(third, 1000).nbytes == 1000


def test_reader_rejects_regions_a_writer_could_not_have_made(ring) -> None:
    writer, reader = ring
    with pytest.raises(RingError):
        reader.view(CAPACITY - 10, 20)  # crosses the end of the buffer
    with pytest.raises(RingError):
        reader.view(0, CAPACITY + 1)  # bigger than the ring
    reader.view(0, 100)
    with pytest.raises(RingError):
        reader.view(50, 10)  # goes backwards
    with pytest.raises(RingError):
        reader.view(100, CAPACITY)  # would overlap the unfreed region


def test_blocking_reserve_gives_up_when_the_peer_is_gone(ring) -> None:
    writer, _ = ring
    assert writer.try_reserve(CAPACITY) == 0
    asked: list[int] = []

    def still_wanted() -> bool:
        asked.append(1)
        return len(asked) < 2

    assert writer.reserve(10, 0.01, still_wanted) is None
    assert len(asked) == 2


def test_the_semaphore_is_shared_with_a_forked_process_and_has_no_name() -> None:
    """A unit posted in another process is taken here; a wait with a timeout ends with
    SemaphoreTimeout when none comes; /dev/shm gains nothing (the semaphore is in the memfd)."""
    before = set(os.listdir("/dev/shm"))
    segment = Segment.create(4096)
    sem = SharedSemaphore.create(segment, 64)
    try:
        with pytest.raises(SemaphoreTimeout):
            sem.acquire(0)
        t0 = time.monotonic()
        with pytest.raises(SemaphoreTimeout):
            sem.acquire(0.05)
        assert time.monotonic() - t0 >= 0.04
        pid = os.fork()
        if pid == 0:
            try:
                child = SharedSemaphore.attach(segment, 64)
                time.sleep(0.1)  # the parent is asleep in acquire() by now
                child.release()
                child.release()
            finally:
                os._exit(0)
        sem.acquire(5.0)  # woken by the child's post
        assert os.waitpid(pid, 0)[1] == 0
        assert sem.value == 1
        sem.acquire(0)
        assert sem.value == 0
        assert set(os.listdir("/dev/shm")) - before == set()
    finally:
        segment.close()
    with pytest.raises(ValueError):
        sem.release()  # its segment is gone: an error, never a write into unmapped memory


def test_reader_accepts_a_rewound_region_while_it_still_holds_one(ring) -> None:
    """After the ring empties the writer rewinds to the warm front, skipping the rest of the lap;
    a reader that takes several headers at once (a batch) holds the region before the rewind
    while it reads the one after. Failed on the reader that measured from the last freed end."""
    writer, reader = ring
    first = writer.try_reserve(21)
    reader.view(first, 21)
    reader.free()
    assert writer.idle  # (learns of the free)
    second = writer.try_reserve(21)  # empty: rewinds to the next lap's offset 0
    assert second == CAPACITY
    third = writer.try_reserve(21)
    reader.view(second, 21)
    reader.view(third, 21)  # two unfreed, the older one at the lap's start
    reader.free()
    reader.free()


def test_unreserve_takes_back_only_the_newest_region(ring) -> None:
    """A writer interrupted between reserving and announcing gives its region back; the ring is
    as if it had never been handed out (a caller's KeyboardInterrupt mid-copy, issue 9 #2)."""
    writer, reader = ring
    a = writer.try_reserve(1000)
    b = writer.try_reserve(1000)
    with pytest.raises(RingError):
        writer.unreserve(a)
    writer.unreserve(b)
    assert writer.try_reserve(3096) == b  # all but a's 1000 bytes are free again, from b on


def test_unreserve_takes_back_the_newest_regions_one_by_one(ring) -> None:
    """Jobs stacked on a worker that never got their headers are taken back newest first
    (PoolCore.take_back_unsent): each is the newest region when its turn comes."""
    writer, reader = ring
    a = writer.try_reserve(1000)
    reader.view(a, 1000)
    b = writer.try_reserve(1000)
    c = writer.try_reserve(1000)
    with pytest.raises(RingError):
        writer.unreserve(b)
    writer.unreserve(c)
    writer.unreserve(b)
    assert writer.try_reserve(1000) == b  # as if b and c had never been handed out
    reader.free()

"""claims.py: a job sent to a worker is taken by it or withdrawn by the parent, never both.

Real segments and process-shared semaphores; the race is run with a real forked process."""
import os
from collections.abc import Iterator

import pytest

from shmpool import wire
from shmpool.claims import JobClaims
from shmpool.semaphores import SharedSemaphore
from shmpool.shm import Segment

CAPACITY = 1 << 16


def _header(job_id: int, offset: int, flags: int = 0) -> wire.Header:
    return wire.decode(wire.encode(wire.MsgKind.JOB, job_id, offset, 64, flags))


@pytest.fixture
def request_segment() -> Iterator[tuple[Segment, SharedSemaphore]]:
    segment = Segment.create(wire.request_segment_size(CAPACITY))
    lock = SharedSemaphore.create(segment, wire.claim_semaphore_offset(CAPACITY), 1)
    try:
        yield segment, lock
    finally:
        segment.close()


def _claims(segment: Segment, lock: SharedSemaphore) -> JobClaims:
    assert segment.view is not None
    return JobClaims(segment.view, CAPACITY, lock)


def test_a_job_taken_before_the_withdrawal_stays_taken(request_segment) -> None:
    claims = _claims(*request_segment)
    assert claims.take(_header(7, 0), 1.0, lambda: True) is True
    assert claims.withdraw_below(4096) == 7  # the parent keeps job 7: the worker runs it


def test_jobs_below_the_mark_are_withdrawn_and_later_ones_taken(request_segment) -> None:
    claims = _claims(*request_segment)
    assert claims.take(_header(1, 0), 1.0, lambda: True)
    assert claims.withdraw_below(4096) == 1
    assert claims.take(_header(2, 1024), 1.0, lambda: True) is False  # sent before: withdrawn
    assert claims.take(_header(3, 4095), 1.0, lambda: True) is False
    assert claims.take(_header(4, 4096), 1.0, lambda: True) is True  # placed after the withdrawal
    assert wire.read_taken(request_segment[0].view, CAPACITY) == 4
    # A job in a one-off segment (offset 0, no ring position) is never withdrawn.
    assert claims.take(_header(5, 0, wire.Flag.ONEOFF), 1.0, lambda: True) is True


def test_a_held_lock_withdraws_nothing_and_a_gone_parent_ends_the_wait(request_segment) -> None:
    segment, lock = request_segment
    claims = _claims(segment, lock)
    lock.acquire(0)  # the other side holds it (stopped, or killed holding it)
    assert claims.withdraw_below(4096) is None
    assert wire.read_withdrawn(segment.view, CAPACITY) == 0  # nothing was withdrawn
    assert claims.take(_header(2, 1024), 0.01, lambda: False) is None
    lock.release()
    assert claims.take(_header(2, 1024), 0.01, lambda: False) is True


def test_take_and_withdraw_racing_in_two_processes_agree_on_every_job(request_segment) -> None:
    """A child takes jobs 1..N (ring positions 64 apart) while the parent withdraws below a
    rising mark. Each withdrawal returns the id the child took last; the jobs after it below the
    mark are the parent's to run elsewhere. Every job must be the child's or the parent's:
    never both (it would run twice), never neither (it would never run)."""
    segment, lock = request_segment
    n = 20000
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            child = JobClaims(segment.view, CAPACITY, SharedSemaphore.attach(segment, wire.claim_semaphore_offset(CAPACITY)))
            taken = [job for job in range(1, n + 1) if child.take(_header(job, job * 64), 1.0, lambda: True)]
            os.write(w, ",".join(map(str, taken)).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    claims = _claims(segment, lock)
    withdrawals = []
    for mark in range(64 * 50, (n + 1) * 64, 64 * 50):
        seen = claims.withdraw_below(mark)
        assert seen is not None
        withdrawals.append((mark, seen))
    data = b""
    while chunk := os.read(r, 1 << 16):
        data += chunk
    os.close(r)
    assert os.waitpid(pid, 0)[1] == 0
    taken = {int(x) for x in data.decode().split(",") if x}
    parents = set()
    for mark, seen in withdrawals:
        parents.update(range(seen + 1, (mark - 1) // 64 + 1))
    assert not taken & parents, f"{len(taken & parents)} jobs both taken and withdrawn"
    assert taken | parents == set(range(1, n + 1)), "jobs neither taken nor withdrawn"
    assert taken and parents, "no race happened: the test proves nothing (taken %d, withdrawn %d)" % (len(taken), len(parents))

"""The pool's shared state, and the moves both caller threads and the dispatcher make on it.

Callers place jobs straight into an idle worker's request ring from their own thread (no
hand-off, no wake-up on the fast path); the dispatcher places what waited, after each reply.
Both do it here, under ``lock``. Futures are resolved outside the lock (``flush``), so a
done-callback may call back into the pool.
"""
from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from . import wire
from .channel import Placement, freeze
from .codec import Frozen, IN_PLACE_MIN_BYTES, Parts, oob_bytes_of
from .errors import SubprocException
from .futures import settle
from .interrupts import deferred_signals
from .lifecycle import Job, JobState, Worker, WorkerState, move_job, move_worker
from .shm import SharedMemoryError
from .spares import SpareSegments

# Jobs placed on one worker at a time. One, unless more jobs wait than there are workers and
# recent jobs have been short: then up to four ride in each worker's ring, so a worker starts
# its next job the moment it sends a result instead of idling through our wake-up. Long jobs
# are never stacked: a job placed behind a slow one would wait while another worker sits idle.
PIPELINE_DEPTH = 1
SHORT_JOB_PIPELINE_DEPTH = 64
SHORT_JOB_SECONDS = 0.002  # running average under this: a job queued behind one costs little
# A job running this long is no short job: nothing is stacked behind it, and what was is moved
# (take_back_unsent and withdraw_untaken, from dispatcher._unstack_stalled).
STALL_SECONDS = 0.05
# Headers sent to a worker in one go, at most: the rest stay in the parent, where they can be taken
# back at once; those sent can be withdrawn only under the worker's claim lock (claims.py).
SENT_AHEAD = 32
JOB_SECONDS_WEIGHT = 0.1  # weight of the newest job in that running average
# A job that must wait keeps a private copy of its bytes (the caller may change its arrays
# after submit() returns). From this size the copy goes into a memfd of its own, which is then
# sent as it is: one copy, as for a job placed at once.
STAGE_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class PoolStats:
    """Counters since the pool started. ``copied_*`` counts payload bytes memcpy'd on the way
    (sender's writes into shared memory or a private snapshot, plus receiver's read out of it),
    so ``copied_to_workers / bytes_to_workers`` is the copies each byte took (2.0 for pickled
    bytes, about 1.0 for big numpy arrays sent out of band and used in place)."""

    jobs_submitted: int = 0
    jobs_completed: int = 0
    jobs_failed: int = 0
    bytes_to_workers: int = 0
    bytes_from_workers: int = 0
    copied_to_workers: int = 0
    copied_from_workers: int = 0
    oneoff_segments: int = 0  # payloads sent to workers in a segment of their own (over the ring)
    warm_segments: int = 0  # payloads over the ring (either way) written into a segment in use already, not a fresh one
    spare_bytes: int = 0  # warm segments kept now (spares.py)
    workers_started: int = 0
    workers_died: int = 0
    jobs_withdrawn: int = 0  # sent to a worker stuck on a long job, then run by another (claims.py)


def new_pool_lock() -> threading.RLock:
    """The pool's lock. Re-entrant only so that a re-entry can be seen and refused
    (``refuse_reentry``): no code of the pool takes it twice."""
    return threading.RLock()


def refuse_reentry(lock: threading.RLock) -> None:
    """Raise if this thread holds ``lock``: a finalizer the garbage collector ran, or a signal
    handler, inside the pool's own critical section, calling back into the pool. Going on
    would work on half-changed state, and waiting would wait for this thread forever."""
    if lock._is_owned():  # type: ignore[attr-defined]
        raise RuntimeError(
            "a SubprocPool was called from code that ran inside that pool's own locked section on "
            "the same thread (a __del__ or weakref callback run by the garbage collector, or a "
            "signal handler): call it from elsewhere, e.g. hand the work to another thread"
        )


class _LockHeldSafely:
    """``with core.guarded():``: the pool's lock, taken by a caller's thread with Python signal
    handlers held back until it is released, so a handler that calls into the pool (a SIGTERM
    handler calling ``shutdown()``) never waits for a lock its own thread holds. One per use."""

    __slots__ = ("_lock", "_signals")

    def __init__(self, lock: threading.RLock) -> None:
        self._lock = lock
        self._signals = deferred_signals()

    def __enter__(self) -> None:
        refuse_reentry(self._lock)
        self._signals.__enter__()
        try:
            self._lock.acquire()
        except BaseException:
            self._signals.__exit__(None, None, None)
            raise

    def __exit__(self, *exc: object) -> None:
        self._lock.release()
        self._signals.__exit__(*exc)


class PoolCore:
    def __init__(
        self, nprocs: int, zero_copy: bool, remote_error_class: type[SubprocException], spare_limit: int | None = None
    ) -> None:
        self.nprocs = nprocs
        self.lock = new_pool_lock()
        self.pending: collections.deque[Job] = collections.deque()  # QUEUED jobs, in order
        self.workers: dict[int, Worker] = {}  # every worker not yet GONE, by serial
        self.closing = False
        self.quiesced = False
        self.counts: dict[str, int] = dataclasses.asdict(PoolStats())
        self.job_seconds = SHORT_JOB_SECONDS  # running average of job time: no stacking before a short job is seen
        self.last_activity = time.monotonic()
        self.remote_error_class = remote_error_class
        self.zero_copy = zero_copy  # the pool's pickler has the zero-copy hooks (pickler.has_zero_copy)
        self._to_settle: list[tuple[Future, Any, BaseException | None]] = []
        self._unsent: list[tuple[Worker, list[bytes]]] = []  # dispatcher only: see place_pending
        self.wake: Callable[[], None] = lambda: None  # the dispatcher's; set when it starts
        self.spares = SpareSegments(spare_limit)

    # ------------------------------------------------------------ resolving, under lock

    def resolve(
        self, job: Job, value: Any = None, exc: BaseException | None = None, into: list | None = None
    ) -> None:
        """``job`` is over: drop its bytes, queue its future's resolution for ``flush`` (or in
        ``into``, for a caller that settles them itself once out of the lock)."""
        move_job(job, JobState.DONE)
        job.drop_payload()
        # A job that was placed is running: its future cannot have been cancelled. One cancelled
        # while it waited still goes to settle(), which marks it notified for wait().
        if job.running or not job.future.done():
            self.counts["jobs_failed" if exc is not None else "jobs_completed"] += 1
            (self._to_settle if into is None else into).append((job.future, value, exc))
        elif job.future.cancelled():
            (self._to_settle if into is None else into).append((job.future, None, None))

    def guarded(self) -> _LockHeldSafely:
        """``lock``, for a caller's thread (see _LockHeldSafely); the dispatcher takes ``lock``."""
        return _LockHeldSafely(self.lock)

    def flush(self) -> None:
        """Resolve queued futures. Call without ``lock``: done-callbacks may call back in."""
        if not self._to_settle:
            return
        with self.guarded():
            todo, self._to_settle = self._to_settle, []
        escaped: BaseException | None = None
        for future, value, exc in todo:
            try:
                settle(future, value, exc)
            except BaseException as e:  # a main-thread callback's Ctrl-C or exit (futures.py): after the rest
                escaped = escaped or e
        if escaped is not None:
            raise escaped

    def stats(self) -> PoolStats:
        with self.guarded():
            counts = dict(self.counts)
        spares = self.spares
        counts["warm_segments"] += spares.reused
        counts["spare_bytes"] = spares.kept_bytes
        return PoolStats(**counts)

    # ------------------------------------------------------------ placing, under lock

    def place_pending(self, now: float, *, send_later: bool = False, answered: Worker | None = None) -> None:
        """Put queued jobs into ready workers' request rings, oldest first. The headers for
        one worker go out together (SENT_AHEAD at most, MAX_BATCH to a message: one wake-up
        for many), behind the ones callers deferred for ``answered`` (the worker whose replies
        the dispatcher just read). They go at once, or with ``send_later`` (the dispatcher) by
        ``send_placed`` once the lock is released, so callers are not kept waiting on the lock
        through the sends (``w.unsent`` keeps other placers off such a worker meanwhile, so its
        headers stay in ring order). A busy worker's headers wait, deferred, for its next reply."""
        if not self.pending and (answered is None or not answered.deferred):
            return  # nothing to place (after most replies): no signal handlers swapped
        with deferred_signals():
            self._place_pending(now, send_later, answered)

    def _place_pending(self, now: float, send_later: bool, answered: Worker | None) -> None:
        full: set[int] = set()
        batches: dict[int, tuple[Worker, list[bytes]]] = {}
        if answered is not None and answered.deferred:
            # At most SENT_AHEAD: a job among them may turn out long, and the ones sent behind it
            # wait for it; those still here can be taken back (take_back_unsent).
            sent, answered.deferred = answered.deferred[:SENT_AHEAD], answered.deferred[SENT_AHEAD:]
            batches[answered.serial] = (answered, sent)
            if answered.deferred:
                full.add(answered.serial)  # headers wait behind these: none joins this message
        pending = self.pending
        try:
            while pending and not self.closing:
                w = self.pick_worker(now, len(pending), full)
                if w is None:
                    return
                entry = batches.get(w.serial)
                if entry is not None and len(entry[1]) < SENT_AHEAD:
                    batch = entry[1]
                elif entry is not None or (w.inflight and w is not answered):
                    # Busy (or SENT_AHEAD on their way): the header waits with those callers
                    # deferred, for its next reply (sent then, or taken back if a job stalls it).
                    batch = w.deferred
                else:  # its deferred headers go first
                    entry = batches[w.serial] = (w, w.deferred)
                    w.deferred = []
                    batch = entry[1]
                job = pending.popleft()  # taken out first: it must not be both queued and placed
                try:
                    placed = self.place(w, job, now, batch)
                except BaseException:
                    if job.state is JobState.QUEUED:
                        pending.appendleft(job)  # place() took it back: still first in line
                    raise
                if placed is None:
                    pending.appendleft(job)
                    full.add(w.serial)  # its ring is busy until its next reply
        finally:
            for w, batch in batches.values():
                if not batch:
                    continue
                if send_later:
                    w.unsent = True
                    self._unsent.append((w, batch))
                else:
                    self._send(w, batch)

    def send_placed(self) -> None:
        """Send the headers ``place_pending(send_later=True)`` gathered. Call without the lock."""
        while self._unsent:
            self.send_now(*self._unsent.pop(0))

    def send_now(self, w: Worker, batch: list[bytes]) -> None:
        """Send headers placed on ``w`` under the lock, now that it is released (``w.unsent``
        kept other placers off ``w`` meanwhile)."""
        try:
            w.endpoint.send_batch(batch)
        except OSError:
            with self.lock:
                self._socket_broke(w)
        w.unsent = False

    def _send(self, w: Worker, batch: list[bytes]) -> None:
        try:
            w.endpoint.send_batch(batch)
        except OSError:
            self._socket_broke(w)

    def _socket_broke(self, w: Worker) -> None:
        # It is dying. Its jobs stay its own until its exit, which puts back the ones it
        # never took (their bytes are in its ring); make that exit come now.
        self.retire(w, "its socket broke while jobs were being placed", time.monotonic())

    def pick_worker(
        self, now: float, waiting: int | None = None, full: set[int] | frozenset[int] = frozenset()
    ) -> Worker | None:
        """The ready worker with the fewest jobs, if one has room for another given that
        ``waiting`` jobs wait (None: one new job plus every job placed already). Up to
        SHORT_JOB_PIPELINE_DEPTH ride in one worker while more jobs wait than there are
        workers and jobs are short, else one; none behind a job running STALL_SECONDS."""
        best: Worker | None = None
        fewest = 1 << 30
        best_rank = 1 << 31
        placed = 0
        stalled_since = now - STALL_SECONDS
        for w in self.workers.values():
            n = len(w.inflight)
            placed += n
            # Among equals, one not busy settling a segment (a full collection, worker.py) first.
            rank = 2 * n + (1 if w.settling else 0)
            if rank < best_rank and w.state is WorkerState.READY and w.serial not in full and not w.unsent:
                if n and w.inflight[0].head_since <= stalled_since:
                    continue  # (w.stalled implies this)
                best, fewest, best_rank = w, n, rank
        if best is None:
            return None
        if waiting is None:
            waiting = placed + 1
        short = waiting > len(self.workers) and self.job_seconds < SHORT_JOB_SECONDS
        return best if fewest < (SHORT_JOB_PIPELINE_DEPTH if short else PIPELINE_DEPTH) else None

    def place(self, w: Worker, job: Job, now: float, batch: list[bytes] | None = None) -> bool | None:
        """Try to put ``job`` on ``w``: True when placed (its header sent, or added to
        ``batch`` for the caller to send), False when the job failed here (it is resolved),
        None when it did not fit (try elsewhere). Callers hold signal handlers back around it
        and the sending of ``batch`` (interrupts.py); any exception that still comes before the
        job is announced takes the placement back, its ring space included (``_withdraw``):
        a job noted as ``w``'s that ``w`` never hears of would stall ``w`` for good."""
        payload = job.payload
        assert payload is not None and job.state is JobState.QUEUED
        if not job.running:
            if not job.future.set_running_or_notify_cancel():
                self.resolve(job)  # cancelled while it waited
                return False
            job.running = True
        placement: Placement | None = None
        mark = len(batch) if batch is not None else 0
        announced = False
        try:
            placement = w.endpoint.stage(payload)
            if placement is None:
                return None
            w.inflight.append(job)
            move_job(job, JobState.PLACED)
            job.placement = placement
            try:
                w.endpoint.announce(wire.MsgKind.JOB, job.job_id, placement, 0, batch)
            except OSError:
                self._socket_broke(w)  # the job is put back when it exits
            announced = True
        except SharedMemoryError as e:  # no memory for a one-off segment: this job only
            self.resolve(job, exc=e)
            return False
        except BaseException:
            if placement is not None and not announced:
                self._withdraw(w, job, placement, batch, mark)
            raise
        if len(w.inflight) == 1:
            self.job_starts(job, now)
        self._count_placed(payload, placement)
        # The bytes are in shared memory now: drop the caller's objects (a job put back in the
        # queue later is read back from the ring, see requeue()).
        payload.release()
        job.payload = None
        return True

    @staticmethod
    def _withdraw(w: Worker, job: Job, placement: Placement, batch: list[bytes] | None, mark: int) -> None:
        """Undo a placement interrupted before its job was announced: as if never tried."""
        if w.inflight and w.inflight[-1] is job:
            w.inflight.pop()
        job.state = JobState.QUEUED
        job.placement = None
        if batch is not None:
            del batch[mark:]
        if placement.oneoff is None:
            w.endpoint.outgoing.unreserve(placement.start)
        else:
            placement.oneoff.close()

    def _count_placed(self, payload: Parts | Frozen, placement: Placement) -> None:
        size = placement.size
        counts = self.counts
        counts["bytes_to_workers"] += size
        in_place = payload.oob_bytes if payload.oob_bytes >= IN_PLACE_MIN_BYTES else 0
        copied = size - in_place  # the worker's read: all but what it uses in place
        if placement.written:
            copied += size  # our write into shared memory
        if not self.zero_copy:
            copied += size  # the worker hands a dumps()/loads()-only pickler bytes of its own
            if isinstance(payload, Parts):
                copied += size  # and that pickler's dumps() made a bytes of it first
        counts["copied_to_workers"] += copied
        if placement.oneoff is not None:
            counts["oneoff_segments"] += 1

    @staticmethod
    def job_starts(job: Job, now: float) -> None:
        """``job`` is now the one its worker runs: its clock (and timeout) starts."""
        job.head_since = now
        if job.timeout is not None:
            job.deadline = now + job.timeout

    def enqueue(self, job: Job) -> None:
        """Queue a job that could not be placed at once, on a private copy of its bytes."""
        self.pending.append(job)

    def frozen(self, payload: Parts) -> Parts | Frozen:
        """What a job that must wait keeps: its own copy, unless its bytes cannot change."""
        if not payload.mutable:
            return payload
        snapshot = freeze(payload, STAGE_BYTES, self.spares)
        # The copy made now: the sender's one write for a staged segment (sent as it is), an
        # extra one for a small snapshot (written into the ring later).
        with self.guarded():
            self.counts["copied_to_workers"] += payload.size
        payload.release()
        return snapshot

    # ------------------------------------------------------------ workers, under lock

    def retire(self, w: Worker, why: str, kill_at: float | None = None) -> None:
        """``w`` takes no new jobs from now on; the dispatcher kills it at ``kill_at`` if it has
        not exited by then."""
        if w.state in (WorkerState.STARTING, WorkerState.READY):
            move_worker(w, WorkerState.RETIRING)
            w.retire_reason = why
        if kill_at is not None and (w.kill_at is None or kill_at < w.kill_at):
            w.kill_at = kill_at
        self.wake()

    def take_back_unsent(self, w: Worker) -> int:
        """Under lock: the jobs stacked on busy ``w`` whose headers it was never sent (the
        tail of its queue, ``w.deferred``) go back to the front of the queue, for whichever
        worker is free first, with their regions of its ring given back. Returns how many."""
        count = len(w.deferred)
        if not count or w.unsent:
            return 0
        jobs = [w.inflight.pop() for _ in range(count)][::-1]
        w.deferred = []
        ring = w.endpoint.outgoing
        for job in reversed(jobs):  # newest first: each is the ring's newest region then
            assert job.placement is not None and job.placement.oneoff is None  # a one-off's header goes at once
            ring.unreserve(job.placement.start)
        # Their bytes stay in place until the next write into the ring, which needs this lock.
        self.requeue(w, jobs)
        return count

    def withdraw_untaken(self, w: Worker) -> int:
        """Under lock: the jobs sent to busy ``w`` that it has not taken go back to the front of
        the queue, for whichever worker is free first (claims.py): ``w`` frees their regions
        unread when it comes to them. Jobs in one-off segments stay. Returns how many."""
        if w.claims is None or w.unsent or w.deferred or len(w.inflight) < 2 or not w.socket_open:
            return 0  # (deferred headers are taken back first: take_back_unsent)
        taken = w.claims.withdraw_below(w.endpoint.outgoing.head)
        if taken is None:
            return 0  # it holds the claim lock (stopped, or dying): they stay
        jobs = list(w.inflight)
        ids = [job.job_id for job in jobs]
        cut = ids.index(taken) + 1 if taken in ids else 0
        kept, withdrawn = jobs[:cut], []
        for job in jobs[cut:]:
            assert job.placement is not None
            if job.placement.oneoff is None:
                withdrawn.append(job)
            else:
                kept.append(job)
        if not withdrawn:
            return 0
        w.inflight.clear()
        w.inflight.extend(kept)
        if kept and cut == 0:
            self.job_starts(kept[0], time.monotonic())  # a one-off job is at the head now
        self.counts["jobs_withdrawn"] += len(withdrawn)
        self.requeue(w, withdrawn)
        return len(withdrawn)

    def requeue(self, w: Worker, jobs: list[Job]) -> None:
        """Jobs ``w`` never took (it died, or they were taken back): back to the front of the
        queue, in order, with the bytes that were written for them (not the caller's objects,
        which may have changed since). Call before ``w``'s rings are closed or written again."""
        ring = w.endpoint.outgoing
        for job in reversed(jobs):
            placement = job.placement
            assert placement is not None
            job.placement = None
            if placement.oneoff is not None:
                segment = placement.oneoff
                segment.ensure(placement.size)  # written through the file: map it to read it back
                assert segment.view is not None
                region = segment.view[: placement.size]
                job.payload = Frozen(region, oob_bytes_of(region), segment)
            else:
                region = memoryview(bytearray(ring.view(placement.start, placement.size)))
                job.payload = Frozen(region, oob_bytes_of(region))
            move_job(job, JobState.QUEUED)
            job.head_since = 0.0
            job.deadline = None
            self.pending.appendleft(job)

"""Jobs and workers as the pool sees them: their states, and every move between states.

Everything here is guarded by the pool's one lock (``PoolCore.lock``). Which thread makes which
move is written beside each state; ``move_job`` and ``move_worker`` are the only places a state
changes, and they refuse a move the table does not allow.

    job:     QUEUED --place--> PLACED --reply / failure / timeout--> DONE
               ^  \\______________________________________________^  (cancelled, shut down,
               |                                                      no worker can start)
               +-- PLACED: its worker died before taking it, or was stalled by a long job
                   before its header went out: back to the queue, bytes intact

    worker:  STARTING --READY--> READY --QUIT / RECYCLE / EOF / kill--> RETIRING
                 \\__________________\\_____________________________________\\--exit--> EXITED --> GONE
"""
from __future__ import annotations

import collections
import enum
import subprocess
from concurrent.futures import Future

from .channel import Endpoint, Placement
from .claims import JobClaims
from .codec import Frozen, Parts
from .shm import Segment


class JobState(enum.Enum):
    QUEUED = "queued"  # in the pool's queue (callers append; callers and dispatcher place)
    PLACED = "placed"  # its header went to a worker; it sits in that worker's ``inflight``
    DONE = "done"  # its future is resolved, or queued for resolving outside the lock


# Keyed by value (read as ``_value_``: ``.value`` is a Python-level property in 3.11) and checked
# by identity: an Enum's own hash is Python code, and this runs twice for every job.
_JOB_MOVES = {
    JobState.QUEUED.value: (JobState.PLACED, JobState.DONE),
    JobState.PLACED.value: (JobState.QUEUED, JobState.DONE),
    JobState.DONE.value: (),
}


class Job:
    """One submitted call. ``payload`` is what can still be written for it: the caller's pickled
    pieces (only until placed or frozen), a frozen copy, or None once it is in a worker's ring.
    ``placement`` is where it went while PLACED."""

    __slots__ = ("job_id", "future", "payload", "timeout", "deadline", "desc", "state", "placement", "head_since", "running")

    def __init__(self, job_id: int, future: Future, payload: Parts | Frozen, timeout: float | None, desc: str) -> None:
        self.job_id = job_id
        self.future = future
        self.payload: Parts | Frozen | None = payload
        self.timeout = timeout
        self.deadline: float | None = None
        self.desc = desc
        self.state = JobState.QUEUED
        self.placement: Placement | None = None
        self.head_since = 0.0
        self.running = False  # its future is marked running: it can no longer be cancelled

    def drop_payload(self) -> None:
        """Let go of every byte this job holds (its future is resolved or its bytes are in a ring)."""
        if self.payload is not None:
            self.payload.release()
            self.payload = None
        if self.placement is not None and self.placement.oneoff is not None:
            self.placement.oneoff.close()


def move_job(job: Job, to: JobState) -> None:
    if to not in _JOB_MOVES[job.state._value_]:
        raise AssertionError(f"job {job.job_id}: {job.state.name} -> {to.name} is not a move a job makes")
    job.state = to


class WorkerState(enum.Enum):
    STARTING = "starting"  # launched, INIT sent, no READY yet (dispatcher)
    READY = "ready"  # takes jobs (callers and dispatcher place them)
    RETIRING = "retiring"  # takes no new jobs: QUIT sent, RECYCLE, EOF, killed; waits for its exit (dispatcher)
    EXITED = "exited"  # its process is gone; waiting briefly for its exit status (FORK) (dispatcher)
    GONE = "gone"  # its jobs resolved or requeued, its rings closed, out of the table (dispatcher)


_WORKER_MOVES = {
    WorkerState.STARTING.value: (WorkerState.READY, WorkerState.RETIRING, WorkerState.EXITED),
    WorkerState.READY.value: (WorkerState.RETIRING, WorkerState.EXITED),
    WorkerState.RETIRING.value: (WorkerState.EXITED,),
    WorkerState.EXITED.value: (WorkerState.GONE,),
    WorkerState.GONE.value: (),
}


class Worker:
    """The parent's record of one worker process."""

    __slots__ = (
        "serial", "endpoint", "proc", "pid", "pidfd", "state", "inflight", "exitcode",
        "status_known", "socket_open", "kill_at", "status_by", "retire_reason", "expected_exit", "was_ready", "unsent", "deferred",
        "settling", "peeked", "delivered_early", "stalled", "start_by", "claims",
    )

    def __init__(self, serial: int, endpoint: Endpoint, proc: subprocess.Popen | None) -> None:
        self.serial = serial
        self.endpoint = endpoint
        self.proc = proc  # SPAWN: our child; FORK: None (the helper's child)
        self.pid: int | None = proc.pid if proc is not None else None
        self.pidfd = -1  # SPAWN: opened at start; FORK: arrives with FORKED
        self.state = WorkerState.STARTING
        self.inflight: collections.deque[Job] = collections.deque()  # placed, in ring order
        self.exitcode: int | None = None
        self.status_known = False
        self.socket_open = True
        self.kill_at: float | None = None  # RETIRING: SIGKILL if it has not exited by then
        self.status_by: float | None = None  # EXITED: give up waiting for the exit status then
        self.start_by: float | None = None  # STARTING: killed (a failed start) if not READY by then
        self.retire_reason = ""  # why it takes no jobs: named in the error of a job it dies with
        self.expected_exit = False  # we asked it to go (QUIT, RECYCLE, timeout, shutdown)
        self.was_ready = False  # it got as far as READY (else its death is a failed start)
        self.unsent = False  # headers placed under the lock are being sent outside it: place none behind
        self.claims: JobClaims | None = None  # the lock and marks to withdraw jobs it has not taken
        # Headers of jobs callers placed behind its running ones. The dispatcher sends them with
        # its next placements, after the worker's next reply: a busy worker needs no wake-up.
        self.deferred: list[bytes] = []
        # Its running job has run far past the short jobs stacked behind it: nothing more is
        # stacked on it, and those whose headers it never got were taken back (core.take_back_unsent),
        # those it got but has not taken withdrawn (core.withdraw_untaken).
        # Set by the dispatcher, cleared on its next reply, under the lock.
        self.stalled = False
        # One-off segments of jobs it answered UNSETTLED, by job id: it still maps them until its
        # SETTLED message (wire.py); they go to the spares then, or are closed when it is gone.
        # Changed by the dispatcher only, under the lock (placement prefers workers without any).
        self.settling: dict[int, Segment] = {}
        # Held replies read from its journal while it lives (dispatcher._peek_held), by job id:
        # their headers, when it sends them, are skipped. And the job last peeked for. Dispatcher only.
        self.delivered_early: set[int] = set()
        self.peeked = -1

    def close_settling(self) -> None:
        """It is gone (or going): nobody will settle its segments; close them."""
        settling, self.settling = self.settling, {}
        for segment in settling.values():
            segment.close()

    @property
    def live(self) -> bool:
        """Counts towards the pool's size: starting or ready."""
        return self.state in (WorkerState.STARTING, WorkerState.READY)


def move_worker(w: Worker, to: WorkerState) -> None:
    if to not in _WORKER_MOVES[w.state._value_]:
        raise AssertionError(f"worker {w.serial}: {w.state.name} -> {to.name} is not a move a worker makes")
    w.state = to

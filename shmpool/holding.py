"""Reply headers a worker holds back, so that replies to a run of short jobs reach the parent as
one message (one wake-up of its dispatcher for all of them).

A held reply is never late and never lost:
  - none waits longer than ``HOLD_SECONDS``: the worker sends what it holds before it starts a
    job once that time has passed, and a flusher thread sends it at that deadline while a job
    runs (a short job's answer must not wait for a long one behind it, and the parent starts the
    next job's clock, its timeout included, only on that answer);
  - each held header is also journaled in the request segment's control block (wire.py): a
    worker that dies holding replies (a job behind them crashed) loses none; the parent reads
    them from the journal and the results from the response ring. It reads a live worker's
    journal too when a job behind held replies runs 20 ms or reaches its timeout: a long C call
    that keeps the GIL starves the flusher thread (dispatcher._peek_held).

Everything that sends on the worker's socket goes through here, under one lock, so the flusher
and the worker's own sends never interleave and replies stay in ring order.
"""
from __future__ import annotations

import threading
import time

from . import wire
from .channel import Endpoint, Placement

# A reply header is held back only after a job this short, and never for longer: the parent
# stacks jobs only while they average under 2 ms (core.SHORT_JOB_SECONDS), so this is the delay
# it already accepts.
HOLD_SECONDS = 0.002


class HeldReplies:
    def __init__(self, endpoint: Endpoint, request: memoryview, ring_capacity: int) -> None:
        self._endpoint = endpoint
        self._request = request
        self._capacity = ring_capacity
        self._headers: list[bytes] = []
        self._since = 0.0  # when the oldest held header was written
        self._journaled = 0  # headers the journal holds now
        self._lock = threading.Lock()
        self._due = threading.Condition(self._lock)  # the flusher waits on it
        self._flusher: threading.Thread | None = None
        self._flusher_idle = False  # waiting with no deadline, for a header to be held

    def __bool__(self) -> bool:
        return bool(self._headers)

    def __len__(self) -> int:
        return len(self._headers)

    def overdue(self) -> bool:
        return bool(self._headers) and time.monotonic() - self._since > HOLD_SECONDS

    def announce(self, kind: wire.MsgKind, job_id: int, placement: Placement, flags: int, hold: bool) -> None:
        """Send a reply's header, with every header held before it; with ``hold``, keep it back
        instead (sent by ``send``, the flusher, or when a batch fills)."""
        with self._lock:
            was_empty = not self._headers
            if hold and was_empty:
                self._since = time.monotonic()
            self._endpoint.announce(kind, job_id, placement, flags, self._headers)  # may send them all
            if not hold:
                self._send_locked()
            self._journal()
            if self._headers and was_empty:
                self._wake_flusher()

    def send(self) -> None:
        """Send every held header now."""
        if self._headers:
            with self._lock:
                self._send_locked()

    def send_control(self, kind: wire.MsgKind, job_id: int, flags: int = 0) -> None:
        """A control message, after every held header (they answer earlier jobs)."""
        with self._lock:
            self._send_locked()
            self._endpoint.send_control(kind, job_id, flags=flags)

    def _send_locked(self) -> None:
        if self._headers:
            self._endpoint.send_batch(self._headers)
        self._journal()  # only once they are out

    def _journal(self) -> None:
        if self._headers or self._journaled:
            wire.journal_held(self._request, self._capacity, self._headers)
            self._journaled = len(self._headers)

    def _wake_flusher(self) -> None:
        # Only a flusher waiting for nothing needs waking: one in a timed wait wakes by itself
        # (at most every HOLD_SECONDS under a stream of batches, not once a batch).
        if self._flusher is None:
            self._flusher = threading.Thread(target=self._flush_when_due, name="shmpool-reply-flusher", daemon=True)
            self._flusher.start()
        elif self._flusher_idle:
            self._due.notify()

    def _flush_when_due(self) -> None:
        """The flusher thread: sends what is held once it has waited HOLD_SECONDS."""
        with self._lock:
            while True:
                if not self._headers:
                    self._flusher_idle = True
                    self._due.wait()
                    self._flusher_idle = False
                    continue
                left = self._since + HOLD_SECONDS - time.monotonic()
                if left > 0:
                    self._due.wait(left)
                    continue
                try:
                    self._send_locked()
                except OSError:
                    return  # the parent is gone: the worker sees EOF and exits

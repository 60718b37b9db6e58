"""Reply headers a worker holds back, so that replies to a run of short jobs reach the parent as
one message (one wake-up of its dispatcher for all of them).

A held reply is never lost and never late for long:
  - each held header is journaled in the request segment's control block (wire.py) before the
    next job starts. A worker that dies holding replies (a job behind them crashed) loses none:
    the parent reads them from the journal and the results from the response ring;
  - the worker sends what it holds when its queue runs dry, when a batch fills, and before it
    starts a job once they have waited HOLD_SECONDS. While a job runs it sends nothing, so when
    a job with others queued behind it has run HELD_PEEK_SECONDS (20 ms) without an answer, or
    reaches its timeout, the parent reads the live worker's journal itself
    (``dispatcher._peek_held``): a short job's answer never waits for the long job behind it,
    the job timed is the one running, and no thread of the worker's has to wake for it (a
    flusher thread cost every job 15 us here, and a long C call holding the GIL starves one).
"""
from __future__ import annotations

import time

from . import wire
from .channel import Endpoint, Placement

# A reply header is held back only after a job this short, and goes out before the next job
# starts once it has waited this long: the parent stacks jobs only while they average under
# 2 ms (core.SHORT_JOB_SECONDS), so this is the delay it already accepts.
HOLD_SECONDS = 0.002


class HeldReplies:
    def __init__(self, endpoint: Endpoint, request: memoryview, ring_capacity: int) -> None:
        self._endpoint = endpoint
        self._request = request
        self._capacity = ring_capacity
        self.headers: list[bytes] = []  # held now, oldest first (read-only outside this class)
        self._since = 0.0  # when the oldest held header was written
        self._journaled = 0  # headers the journal holds now
        self._seq = 0  # the journal's sequence number (wire.journal_held)

    def overdue(self) -> bool:
        return bool(self.headers) and time.monotonic() - self._since > HOLD_SECONDS

    def announce(self, kind: wire.MsgKind, job_id: int, placement: Placement, flags: int, hold: bool) -> None:
        """Send a reply's header, with every header held before it; with ``hold``, keep it back
        instead (sent by ``send``, or when a batch fills), journaled."""
        if hold and not self.headers:
            self._since = time.monotonic()
        self._endpoint.announce(kind, job_id, placement, flags, self.headers)  # may send them all
        if not hold:
            self.send()
        else:
            self._journal()

    def send(self) -> None:
        """Send every held header now."""
        if self.headers:
            self._endpoint.send_batch(self.headers)
        self._journal()  # only once they are out

    def send_control(self, kind: wire.MsgKind, job_id: int, flags: int = 0) -> None:
        """A control message, after every held header (they answer earlier jobs)."""
        self.send()
        self._endpoint.send_control(kind, job_id, flags=flags)

    def _journal(self) -> None:
        headers = self.headers
        if len(headers) != self._journaled:
            kept = self._journaled if len(headers) > self._journaled else 0
            self._seq = wire.journal_held(self._request, self._capacity, self._seq, headers, kept)
            self._journaled = len(headers)

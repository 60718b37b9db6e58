"""The wire header: the only thing that ever crosses a socket between shmpool processes.

Every message is one fixed-size header; payload bytes live in shared memory and the header
only says where. The layout, little-endian, 32 bytes::

    0       4    5    6         8                16               24               32
    +-------+----+----+---------+----------------+----------------+----------------+
    | magic |ver |kind|  flags  |     job_id     |     offset     |     length     |
    | SHMP  | u8 | u8 |   u16   |      u64       |      u64       |      u64       |
    +-------+----+----+---------+----------------+----------------+----------------+

``offset`` is a position in the sender's ring (a monotonically increasing byte count; the
physical offset is ``offset % capacity``) or 0 for a one-off segment, whose memfd travels
beside the header as SCM_RIGHTS ancillary data (flag ``ONEOFF``), or 0 in the segment the
reply's job came in (flag ``IN_JOB_SEGMENT``: no fd, the parent has it). For control messages the
two u64 fields carry small integers named at each kind below.

A message on a socket is one header, or up to ``MAX_BATCH`` of them back to back when a side
has several to send at once (jobs stacked for a worker, replies to short jobs): one wake-up
for all of them. A message that carries fds carries exactly one header.

The request segment (parent -> worker), one per worker::

    0                        ring_capacity  +8        +24                   +536        +544     +928     +960     +992     + CONTROL_BYTES
    +------------------------+----------+----------+--------------------+-----------+--------+--------+--------+--------+
    | ring: job payloads     | taken id | held: n  | n held reply       | withdrawn | unused | claim  | freed: | freed: |
    | (ring.py)              |          |          | headers            | below     |        | lock   | request| response
    +------------------------+----------+----------+--------------------+-----------+--------+--------+--------+--------+
                             0          8          24                   536         544      928      960      992      1024

The response segment (worker -> parent) is all ring. Job ids start at 1: id 0 names the
worker's own set-up (INIT, and the ERROR an initializer that raised sends back).
"""
from __future__ import annotations

import enum
import struct
from typing import NamedTuple

MAGIC = b"SHMP"
VERSION = 7  # 2: FORKED carries a pidfd; ERROR carries (name, details, infra error). 3: replies in the job's segment, no ACK. 4: SETTLED. 5: held-reply journal. 6: semaphores in the control block. 7: jobs withdrawn from a stalled worker (claims.py)
HEADER = struct.Struct("<4sBBHQQQ")
HEADER_SIZE = HEADER.size  # 32
MAX_BATCH = 16  # headers in one message at most
_U64_MAX = (1 << 64) - 1

SETUP_JOB_ID = 0

# The request segment ends with a control block its ring never uses. The parent reads it once the
# worker is dead, or under the claim lock below while it lives:
#  - at offset 0, the id of each job the worker takes off the socket, stored before it touches the
#    payload: it tells a job that started (fail it: it may be what killed the worker) from one the
#    worker never read (run it elsewhere);
#  - at offset 8, the journal of reply headers the worker holds back (holding.py): a sequence number,
#    odd while the worker rewrites the journal, then their count and the headers; the count goes
#    back to 0 once they are sent. A worker that dies holding replies to finished jobs loses none of
#    them: their results are in the response ring, and the parent reads them from there. The parent
#    also reads a live worker's journal (sequence unchanged and even around the read), when a job
#    behind held replies runs long, which keeps the worker from sending them.
CONTROL_BYTES = 1024
#  - at offset 536, a ring position: the jobs in the ring below it that the worker has not taken
#    are withdrawn (the parent runs them elsewhere; the worker frees their regions unread), and at
#    offset 928 the lock both sides hold to take or withdraw a job, so that each job is one or
#    the other, never both (claims.py);
#  - at offsets 960 and 992, the two rings' ``freed`` semaphores (semaphores.py: process-shared
#    sem_t, no name), the request ring's and the response ring's, which the parent makes there.
TAKEN = struct.Struct("<Q")  # at offset 0 of the control block: id of the job last taken
WITHDRAWN = struct.Struct("<Q")  # at offset 536: ring position below which untaken jobs are withdrawn
WITHDRAWN_AT = 536
CLAIM_AT = 928
REQUEST_FREED_AT = 960
RESPONSE_FREED_AT = 992
_JOURNAL = struct.Struct("<QQ")  # sequence, count
_JOURNAL_AT = 8
_HEADERS_AT = 24


def freed_semaphore_offsets(ring_capacity: int) -> tuple[int, int]:
    """Where in the request segment the request and the response ring's ``freed`` semaphores are."""
    return ring_capacity + REQUEST_FREED_AT, ring_capacity + RESPONSE_FREED_AT


def claim_semaphore_offset(ring_capacity: int) -> int:
    """Where in the request segment the lock that takes or withdraws a job is (claims.py)."""
    return ring_capacity + CLAIM_AT


def request_segment_size(ring_capacity: int) -> int:
    return ring_capacity + CONTROL_BYTES


def request_ring_capacity(segment_size: int) -> int:
    """The ring part of a request segment; raises WireError when there is none."""
    if segment_size <= CONTROL_BYTES:
        raise WireError(f"request segment of {segment_size} bytes has no room for a ring")
    return segment_size - CONTROL_BYTES


def read_taken(request: memoryview, ring_capacity: int) -> int:
    return TAKEN.unpack_from(request, ring_capacity)[0]


def mark_taken(request: memoryview, ring_capacity: int, job_id: int) -> None:
    TAKEN.pack_into(request, ring_capacity, job_id)


def read_withdrawn(request: memoryview, ring_capacity: int) -> int:
    return WITHDRAWN.unpack_from(request, ring_capacity + WITHDRAWN_AT)[0]


def mark_withdrawn(request: memoryview, ring_capacity: int, position: int) -> None:
    WITHDRAWN.pack_into(request, ring_capacity + WITHDRAWN_AT, position)


def journal_held(request: memoryview, ring_capacity: int, seq: int, headers: list[bytes], kept: int) -> int:
    """Record the reply headers held now (at most MAX_BATCH), of which the first ``kept`` are in
    the journal already; the sequence, ``seq`` until now (even), is odd meanwhile. Returns the
    new sequence."""
    at = ring_capacity + _JOURNAL_AT
    _JOURNAL.pack_into(request, at, seq + 1, kept)  # the first ``kept`` stay whole throughout
    if len(headers) > kept:
        start = ring_capacity + _HEADERS_AT + kept * HEADER_SIZE
        data = headers[kept] if len(headers) == kept + 1 else b"".join(headers[kept:])
        request[start : start + len(data)] = data
    _JOURNAL.pack_into(request, at, seq + 2, len(headers))
    return seq + 2


def read_held(request: memoryview, ring_capacity: int, *, alive: bool) -> list[Header] | None:
    """The held reply headers a worker journaled; for an ``alive`` one, None when no steady copy
    could be read (it kept rewriting the journal). A dead one's is read as it is: while the
    worker writes new headers the count covers only those written before. Raises WireError on
    a malformed journal."""
    at = ring_capacity + _JOURNAL_AT
    start = ring_capacity + _HEADERS_AT
    for _ in range(8):
        seq, count = _JOURNAL.unpack_from(request, at)
        if (alive and seq % 2) or count > MAX_BATCH:
            continue
        data = bytes(request[start : start + count * HEADER_SIZE])
        if _JOURNAL.unpack_from(request, at)[0] != seq:
            continue
        return [decode(data[i : i + HEADER_SIZE]) for i in range(0, len(data), HEADER_SIZE)]
    seq, count = _JOURNAL.unpack_from(request, at)
    if count > MAX_BATCH:
        raise WireError(f"a journal of {count} held replies (at most {MAX_BATCH})")
    return None


class MsgKind(enum.IntEnum):
    # parent -> worker
    INIT = 1  # payload: the worker's set-up (sys.path, pickler, initializer); first message
    JOB = 2  # payload: (fn, args, kwargs) pickled with the pool's pickler
    QUIT = 3  # no payload: finish and exit
    # worker -> parent
    READY = 10  # no payload: INIT done; offset = worker pid
    RESULT = 11  # payload: the job's return value
    ERROR = 12  # payload: (exception name, traceback text, shmpool error or None), plain pickle
    # No payload: job_id = a job whose reply said UNSETTLED; flags = KEPT or 0, the final word
    # on its one-off segment, sent once the worker's full cyclic collection has run.
    SETTLED = 13
    # parent <-> fork helper
    FORK = 20  # parent -> helper; fds: socket, request ring, response ring; job_id = worker serial
    FORKED = 21  # helper -> parent; job_id = worker serial, offset = pid; fds: the worker's pidfd
    REAPED = 22  # helper -> parent; job_id = worker serial, offset = pid, length = raw wait status


class Flag:
    """Bits of the flags field (plain ints: this is on the per-message hot path)."""

    ONEOFF = 1  # the payload is in a one-off memfd sent with this header, not in the ring
    RECYCLE = 2  # RESULT/ERROR: the worker is over its memory cap and exits after this message
    # RESULT/ERROR of a job that came in a one-off segment: the payload is in that segment
    # (grown if it was short), no fd beside the header. The parent reads it, then keeps the
    # segment warm for its next big payload (spares.py).
    IN_JOB_SEGMENT = 4
    # RESULT/ERROR of a job that came in a one-off segment: the job kept views of it, which the
    # worker's mapping keeps alive, so the parent must never write into it again.
    KEPT = 8
    # RESULT/ERROR of a job that came in a one-off segment, sent before the worker knows whether
    # the job kept views of it: some are held only by reference cycles until a full collection
    # (tens of ms with torch loaded), which the worker runs after the reply is out. Its SETTLED
    # message then says KEPT or not; until then the parent must not write into the segment.
    UNSETTLED = 16


_KNOWN_FLAGS = Flag.ONEOFF | Flag.RECYCLE | Flag.IN_JOB_SEGMENT | Flag.KEPT | Flag.UNSETTLED
_KINDS = {int(k): k for k in MsgKind}


class WireError(ValueError):
    """A header that is not one shmpool sent: wrong size, magic, version, kind or flags."""


class Header(NamedTuple):
    kind: MsgKind
    job_id: int
    offset: int
    length: int
    flags: int


def encode(kind: MsgKind, job_id: int, offset: int = 0, length: int = 0, flags: int = 0) -> bytes:
    return HEADER.pack(MAGIC, VERSION, kind, flags, job_id, offset, length)


def decode(data: bytes) -> Header:
    """Parse and check one header. Raises WireError, never anything else, on bad input."""
    if len(data) != HEADER_SIZE:
        raise WireError(f"header of {len(data)} bytes, expected {HEADER_SIZE}")
    magic, version, kind, flags, job_id, offset, length = HEADER.unpack(data)
    if magic != MAGIC:
        raise WireError(f"bad magic {magic!r}, expected {MAGIC!r}: not a shmpool peer")
    if version != VERSION:
        raise WireError(f"wire version {version}, this shmpool speaks {VERSION}: mixed installs?")
    msg_kind = _KINDS.get(kind)
    if msg_kind is None:
        raise WireError(f"unknown message kind {kind}")
    if flags & ~_KNOWN_FLAGS:
        raise WireError(f"unknown flags {flags:#x}")
    if offset + length > _U64_MAX:
        raise WireError(f"region {offset}+{length} overflows")
    return Header(msg_kind, job_id, offset, length, flags)

"""One end of a parent<->worker link: a SEQPACKET socket for headers plus the two rings.

Headers go over an AF_UNIX SOCK_SEQPACKET socket pair: message boundaries are kept, EOF says
the peer is gone, and a one-off segment's memfd can ride along as SCM_RIGHTS. Payloads go in
the outgoing ring when they fit in it, else in a one-off memfd sized to them, so a payload of
any size never touches the socket. The ring is preferred because its pages stay mapped and
faulted in: writing 64 MiB into a warm ring takes a few ms, into fresh shmem pages ten times
that (the kernel zeroes and maps each page).
"""
from __future__ import annotations

import array
import errno
import os
import socket
import stat
from collections.abc import Callable

from typing import NamedTuple

from . import wire
from .codec import Frozen, Parts
from .ring import RingReader, RingWriter
from .shm import RegionMapping, Segment, SharedMemoryError
from .spares import SpareSegments

MAX_FDS = 4  # the most any message carries (FORK: socket and two rings)
_FD_ARRAY = array.array("i")


class Payload:
    """A received payload's bytes, and the duty to free them exactly once.

    ``release()`` drops the view, then gives the memory back: a ring region is freed for the
    producer, after the job's own mapping of it (if any) is closed; a one-off segment is
    unmapped and closed, or with ``keep_segment`` only unmapped, its fd left in ``segment``
    for the owner to reuse or close. It returns False when the memory must not be reused: a
    job kept views of it (and, for a ring region, they could not be moved to private memory)."""

    __slots__ = ("view", "segment", "_ring", "_mapping", "_keep_segment", "_reusable")

    def __init__(
        self,
        view: memoryview,
        ring: RingReader | None,
        segment: Segment | None,
        mapping: RegionMapping | None = None,
        *,
        keep_segment: bool = False,
    ) -> None:
        self.view = view
        self.segment = segment
        self._ring = ring
        self._mapping = mapping
        self._keep_segment = keep_segment
        self._reusable = True

    def release(self, *, full_collection: bool = True) -> bool:
        """``full_collection``: see ``Segment.unmap`` (a one-off segment's answer may then be
        provisional; a ring region's never is)."""
        if self.view is None:
            return self._reusable  # released already: the same answer
        self.view.release()
        self.view = None  # type: ignore[assignment]
        reusable = True
        if self._mapping is not None:
            try:
                self._mapping.close()
            except SharedMemoryError:
                reusable = False
        if self._ring is not None and reusable:
            self._ring.free()
        if self.segment is not None:
            reusable = self.segment.unmap(full_collection=full_collection) and reusable
            if not self._keep_segment:
                self.segment.close()
                self.segment = None
        self._reusable = reusable
        return reusable


class Placement(NamedTuple):
    """Where a payload was put: a ring position, or a one-off segment (its fd goes with the
    header; the sender may keep the segment to send it again, or reuse it once the reader is
    done), or the segment the job itself came in (``lent``: the reader has it already)."""

    start: int
    size: int
    oneoff: Segment | None
    written: bool = True  # False: a staged segment sent as it was, no copy made now
    lent: bool = False


def send_header(sock: socket.socket, header: bytes, fds: tuple[int, ...] | list[int] = ()) -> None:
    if fds:
        socket.send_fds(sock, [header], list(fds))
    else:
        sock.send(header)


_ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS * _FD_ARRAY.itemsize)
_TRUNCATED = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)
# Plain ints: socket's MsgFlag members are an enum.IntFlag, and ``int & member`` runs three
# Python calls, for every message read.
_CTRUNC, _TRUNC, _DONTWAIT = int(socket.MSG_CTRUNC), int(socket.MSG_TRUNC), int(socket.MSG_DONTWAIT)


# The fds of a payload's header whose memfd the kernel dropped because this process is at its fd
# limit: none, known by identity (``fds is FDS_DROPPED``). The payload is lost, the link is fine:
# the reader fails that one job, naming the limit.
FDS_DROPPED: list[int] = []


def _at_fd_limit() -> bool:
    try:
        os.close(os.open(os.devnull, os.O_RDONLY))
    except OSError as e:
        return e.errno == errno.EMFILE
    return False
_MESSAGE_SPACE = wire.HEADER_SIZE * wire.MAX_BATCH + 1  # one more byte: a longer message shows as such


def recv_headers(sock: socket.socket, *, block: bool = True) -> tuple[list[wire.Header], list[int]] | None:
    """The headers of the next message and the fds beside it; None at EOF. Raises
    BlockingIOError when nothing is there and the socket (or ``block=False``) does not wait,
    WireError on a malformed message (its fds closed). A payload header whose memfd we could
    not take (our fd limit) comes with FDS_DROPPED."""
    try:
        data, ancdata, msg_flags, _ = sock.recvmsg(_MESSAGE_SPACE, _ANCILLARY_SPACE, 0 if block else _DONTWAIT)
    except ConnectionResetError:
        # The peer closed with messages of ours unread. Linux says so once, ahead of what the peer
        # sent before it went (a reply to a job that finished just before its worker crashed):
        # read on until the socket is empty; only then is it EOF.
        try:
            data, ancdata, msg_flags, _ = sock.recvmsg(_MESSAGE_SPACE, _ANCILLARY_SPACE, _DONTWAIT)
        except (BlockingIOError, ConnectionResetError):
            return None
    fds: list[int] = []
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(cdata[: len(cdata) - len(cdata) % arr.itemsize])
            fds.extend(arr)
    if not data and not fds:
        return None
    try:
        if msg_flags & _CTRUNC and not msg_flags & _TRUNC and len(data) == wire.HEADER_SIZE:
            header = wire.decode(data)
            if header.flags & wire.Flag.ONEOFF and not fds and _at_fd_limit():
                return [header], FDS_DROPPED
        if msg_flags & _TRUNCATED:
            raise wire.WireError("message longer than a batch of headers, or with too many fds")
        n, rest = divmod(len(data), wire.HEADER_SIZE)
        if rest or n == 0:
            raise wire.WireError(f"message of {len(data)} bytes is not a whole number of headers")
        if fds and n != 1:
            raise wire.WireError(f"a message of {n} headers carries fds")
        if n == 1:
            return [wire.decode(data)], fds
        size = wire.HEADER_SIZE
        return [wire.decode(data[i : i + size]) for i in range(0, len(data), size)], fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def recv_header(sock: socket.socket) -> tuple[wire.Header, list[int]] | None:
    """``recv_headers`` for a peer that sends one header per message (the fork helper, INIT)."""
    got = recv_headers(sock)
    if got is None:
        return None
    headers, fds = got
    if len(headers) != 1:
        raise wire.WireError(f"{len(headers)} headers where one was expected")
    return headers[0], fds


def new_segment(size: int, spares: SpareSegments | None, label: str, *, mapped: bool = True) -> Segment:
    """A segment for a payload of ``size`` bytes: a warm spare if there is one (mapped), else a
    fresh one, mapped only if ``mapped`` (else for ``fill``)."""
    if spares is not None:
        return spares.create(size, label, mapped=mapped)
    return Segment.create(size, reserve=mapped, label=label, mapped=mapped)


def fill(payload: Parts | Frozen, segment: Segment, spares: SpareSegments | None) -> None:
    """Write ``payload`` into a one-off ``segment``: a copy into its mapping when it has one (a
    warm spare), else through the file (fresh pages, see ``Segment.write_at``); if memory runs
    out there, the spares are given back and the write tried once more."""
    if segment.view is not None:
        payload.write_into(segment.view[: payload.size])
        return
    try:
        payload.write_to(segment)
    except SharedMemoryError:
        if spares is None or not spares.clear():
            raise
        payload.write_to(segment)


def freeze(parts: Parts | Frozen, stage_bytes: int, spares: SpareSegments | None = None) -> Frozen:
    """A private copy of ``parts``, encoded: into a memfd of its own when at least
    ``stage_bytes`` (sent later as a one-off segment, so the copy made now is the only one),
    else into a plain buffer."""
    if isinstance(parts, Frozen):
        return parts
    if parts.size >= stage_bytes:
        segment = new_segment(parts.size, spares, "shmpool-staged")
        try:
            assert segment.view is not None
            parts.write_into(segment.view)
        except BaseException:
            segment.close()
            raise
        return Frozen(segment.view[: parts.size], parts.oob_bytes, segment)
    buf = bytearray(parts.size)
    parts.write_into(memoryview(buf))
    return Frozen(memoryview(buf), parts.oob_bytes)


class Endpoint:
    """``spares``: where one-off segments come from (the parent's, shared by its workers);
    None in a worker, which makes a fresh one or writes into the one its job came in."""

    def __init__(
        self, sock: socket.socket, outgoing: RingWriter, incoming: RingReader, spares: SpareSegments | None = None
    ) -> None:
        self.sock = sock
        self.outgoing = outgoing
        self.incoming = incoming
        self.spares = spares
        self.oneoff_threshold = outgoing.capacity

    def send_control(self, kind: wire.MsgKind, job_id: int = 0, offset: int = 0, length: int = 0, flags: int = 0) -> None:
        send_header(self.sock, wire.encode(kind, job_id, offset, length, flags))

    def stage(
        self,
        payload: Parts | Frozen,
        wait_step: float | None = None,
        still_wanted: Callable[[], bool] = lambda: True,
        lent: Segment | None = None,
    ) -> Placement | None:
        """Put ``payload`` in shared memory, announcing nothing yet. With ``wait_step`` None
        this never blocks on ring space and returns None when the ring is full right now. An
        exception while writing (a KeyboardInterrupt in the caller's thread, say) gives the
        space back before it propagates. A payload over the ring goes into ``lent`` (the
        segment the peer sent the job in, grown if need be) when given, else a segment of its
        own; either way the placement owns the segment."""
        size = payload.size
        segment = payload.segment if isinstance(payload, Frozen) else None
        if segment is not None:
            payload.segment = None  # the placement owns it now
            return Placement(0, size, segment, written=False)
        if size > self.oneoff_threshold:
            if lent is not None:
                try:
                    lent.ensure(size)
                except SharedMemoryError:
                    lent.close()
                    lent = None
            segment = lent if lent is not None else new_segment(size, self.spares, "shmpool-oneoff", mapped=False)
            try:
                fill(payload, segment, self.spares)
            except BaseException:
                segment.close()
                raise
            return Placement(0, size, segment, lent=lent is not None)
        if wait_step is None:
            start = self.outgoing.try_reserve(size)
        else:
            start = self.outgoing.reserve(size, wait_step, still_wanted)
        if start is None:
            return None
        try:
            payload.write_into(self.outgoing.view(start, size))
        except BaseException:
            self.outgoing.unreserve(start)
            raise
        return Placement(start, size, None)

    def announce(
        self, kind: wire.MsgKind, job_id: int, placement: Placement, flags: int = 0, batch: list[bytes] | None = None
    ) -> None:
        """Send the header for a staged payload, or add it to ``batch`` (sent by
        ``send_batch``); a one-off segment's goes at once, with its fd. Raises OSError if the
        peer is gone."""
        if placement.oneoff is not None:
            if batch:
                self.send_batch(batch)  # keep the order: what was gathered goes first
            if placement.lent:
                self.sock.send(wire.encode(kind, job_id, 0, placement.size, flags | wire.Flag.IN_JOB_SEGMENT))
                return
            header = wire.encode(kind, job_id, 0, placement.size, flags | wire.Flag.ONEOFF)
            send_header(self.sock, header, (placement.oneoff.fd,))
            return
        header = wire.encode(kind, job_id, placement.start, placement.size, flags)
        if batch is None:
            self.sock.send(header)
        else:
            batch.append(header)  # (however many: a busy worker's wait for its next reply)

    def send_batch(self, batch: list[bytes]) -> None:
        """Send the headers gathered in ``batch``, MAX_BATCH to a message, and empty it."""
        if batch:
            messages = [b"".join(batch[i : i + wire.MAX_BATCH]) for i in range(0, len(batch), wire.MAX_BATCH)]
            batch.clear()
            for data in messages:
                self.sock.send(data)

    def send_payload(
        self,
        kind: wire.MsgKind,
        job_id: int,
        parts: Parts,
        flags: int,
        wait_step: float,
        still_wanted: Callable[[], bool],
        *,
        release: bool = False,
    ) -> bool:
        """Stage and announce, waiting for ring space (the worker's replies). ``release`` drops
        ``parts``' references once written, before the header goes out: a sender that will not
        resend frees its copy before the reader makes another. False if ``still_wanted`` said no."""
        placement = self.stage(parts, wait_step, still_wanted)
        if placement is None:
            return False
        if release:
            parts.release()
        try:
            self.announce(kind, job_id, placement, flags)
        finally:
            if placement.oneoff is not None:
                placement.oneoff.close()  # the fd in flight keeps the memory alive for the reader
        return True

    def open_payload(
        self, header: wire.Header, fds: list[int], *, lent: Segment | None = None, keep_segment: bool = False
    ) -> Payload:
        """The payload a header points at, checked against what the header may claim: in the
        ring, in a one-off segment sent with it (``keep_segment``: left to the caller after
        release), or in ``lent``, the segment its job went out in (IN_JOB_SEGMENT)."""
        if header.flags & wire.Flag.IN_JOB_SEGMENT:
            if fds or header.flags & wire.Flag.ONEOFF or lent is None or header.offset != 0:
                for fd in fds:
                    os.close(fd)
                raise wire.WireError("a reply in its job's segment, for a job that was not sent in one")
            have = os.fstat(lent.fd).st_size  # the worker grows it before writing a longer reply
            if header.length > have:
                raise wire.WireError(f"a reply of {header.length} bytes in its job's segment of {have}")
            lent.ensure(header.length)  # maps what the worker added
            assert lent.view is not None
            return Payload(lent.view[: header.length], None, None)
        if header.flags & wire.Flag.ONEOFF:
            if len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                raise wire.WireError(f"one-off payload with {len(fds)} fds, expected 1")
            st = os.fstat(fds[0])
            if not stat.S_ISREG(st.st_mode):  # a memfd is a regular file
                os.close(fds[0])
                raise wire.WireError("one-off payload fd is not a shared-memory segment")
            if header.offset != 0 or header.length > st.st_size:
                os.close(fds[0])
                raise wire.WireError(f"one-off payload claims {header.length} bytes at {header.offset} of a {st.st_size}-byte segment")
            segment = Segment.attach(fds[0], populate=True, length=header.length)
            assert segment.view is not None
            return Payload(segment.view, None, segment, keep_segment=keep_segment)
        if fds:
            for fd in fds:
                os.close(fd)
            raise wire.WireError("ring payload arrived with fds")
        return Payload(self.incoming.view(header.offset, header.length), self.incoming, None)

    def close(self) -> None:
        self.sock.close()
        self.outgoing.segment.close()
        self.incoming.segment.close()

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
import os
import socket
from collections.abc import Callable

from . import wire
from .codec import Parts
from .ring import RingReader, RingWriter
from .shm import Segment

MAX_FDS = 4  # the most any message carries (FORK: socket and two rings)
_FD_ARRAY = array.array("i")


class Payload:
    """A received payload's bytes, and the duty to free them exactly once."""

    __slots__ = ("view", "_ring", "_segment")

    def __init__(self, view: memoryview, ring: RingReader | None, segment: Segment | None) -> None:
        self.view = view
        self._ring = ring
        self._segment = segment

    def release(self) -> None:
        if self.view is None:
            return
        self.view.release()
        self.view = None  # type: ignore[assignment]
        if self._ring is not None:
            self._ring.free()
        if self._segment is not None:
            self._segment.close()


def send_header(sock: socket.socket, header: bytes, fds: tuple[int, ...] | list[int] = ()) -> None:
    if fds:
        socket.send_fds(sock, [header], list(fds))
    else:
        sock.send(header)


_ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS * _FD_ARRAY.itemsize)
_TRUNCATED = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)


def recv_header(sock: socket.socket) -> tuple[wire.Header, list[int]] | None:
    """Next header and the fds beside it; None at EOF. Raises BlockingIOError on a
    non-blocking socket with nothing to read, WireError on a malformed header."""
    try:
        data, ancdata, msg_flags, _ = sock.recvmsg(wire.HEADER_SIZE + 1, _ANCILLARY_SPACE)
    except ConnectionResetError:
        return None  # the peer closed with messages of ours unread: gone all the same
    fds: list[int] = []
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(cdata[: len(cdata) - len(cdata) % arr.itemsize])
            fds.extend(arr)
    if not data and not fds:
        return None
    try:
        if msg_flags & _TRUNCATED:
            raise wire.WireError("message longer than a header, or with too many fds")
        return wire.decode(data), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


class Endpoint:
    def __init__(self, sock: socket.socket, outgoing: RingWriter, incoming: RingReader) -> None:
        self.sock = sock
        self.outgoing = outgoing
        self.incoming = incoming
        self.oneoff_threshold = outgoing.capacity

    def send_control(self, kind: wire.MsgKind, job_id: int = 0, offset: int = 0, length: int = 0) -> None:
        send_header(self.sock, wire.encode(kind, job_id, offset, length))

    def send_payload(
        self,
        kind: wire.MsgKind,
        job_id: int,
        parts: Parts,
        flags: int = 0,
        wait_step: float | None = None,
        still_wanted: Callable[[], bool] = lambda: True,
        *,
        release: bool = False,
    ) -> bool:
        """Place ``parts`` in shared memory and send its header. With ``wait_step`` None this
        never blocks on ring space and returns False when the ring is full right now.
        ``release`` drops ``parts``' references once written, before the header goes out: a
        sender that will not resend frees its copy before the reader makes another."""
        size = parts.size
        if size > self.oneoff_threshold:
            segment = Segment.create(size, reserve=True, label="shmpool-oneoff")
            try:
                assert segment.view is not None
                parts.write_into(segment.view)
                if release:
                    parts.release()
                header = wire.encode(kind, job_id, 0, size, flags | wire.Flag.ONEOFF)
                send_header(self.sock, header, (segment.fd,))
            finally:
                segment.close()  # the fd in flight keeps the memory alive for the reader
            return True
        if wait_step is None:
            start = self.outgoing.try_reserve(size)
        else:
            start = self.outgoing.reserve(size, wait_step, still_wanted)
        if start is None:
            return False
        parts.write_into(self.outgoing.view(start, size))
        if release:
            parts.release()
        send_header(self.sock, wire.encode(kind, job_id, start, size, flags))
        return True

    def open_payload(self, header: wire.Header, fds: list[int]) -> Payload:
        """The payload a header points at, checked against what the header may claim."""
        if header.flags & wire.Flag.ONEOFF:
            if len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                raise wire.WireError(f"one-off payload with {len(fds)} fds, expected 1")
            segment = Segment.attach(fds[0], populate=True)
            if header.offset != 0 or header.length > segment.size:
                segment.close()
                raise wire.WireError(f"one-off payload claims {header.length} bytes of a {segment.size}-byte segment")
            assert segment.view is not None
            return Payload(segment.view[: header.length], None, segment)
        if fds:
            for fd in fds:
                os.close(fd)
            raise wire.WireError("ring payload arrived with fds")
        return Payload(self.incoming.view(header.offset, header.length), self.incoming, None)

    def close(self) -> None:
        self.sock.close()
        self.outgoing.segment.close()
        self.incoming.segment.close()

"""How a pickled object is laid out in a shared-memory region, and read back.

Region layout, little-endian, written once by the sender::

    0                8        12       16
    +----------------+--------+--------+------------------------+--------+-------+---...
    |   stream_len   |  nbuf  |   0    | nbuf x (u64 off,u64 n) | stream |  pad  | buf0 ...
    +----------------+--------+--------+------------------------+--------+-------+---...

The pickle stream comes first; out-of-band buffers (pickle protocol 5) follow, each at a
64-byte aligned offset so numpy gets aligned arrays. Copies: ``Parts`` holds the pieces by
reference (large ``bytes`` are handed to the sink by the C pickler itself, not copied), so
``write_into`` is the sender's only copy. The receiver's unpickler copies in-band bytes once
into the objects it builds; out-of-band buffers are either used in place (job arguments, whose
slot is held until the job ends) or copied once (results, which outlive the slot).
"""
from __future__ import annotations

import pickle
import struct
from typing import Any

from .errors import PayloadTooLargeError, describe_job
from .pages import copy_out
from .pickler import SubprocPickler, has_zero_copy

_TABLE = struct.Struct("<QII")
_ENTRY = struct.Struct("<QQ")
_ALIGN = 64
# Out-of-band arguments at least this big are used in place by the job (views of its own
# mapping of the request region, see shm.RegionMapping); smaller ones are copied, which costs
# less than mapping them.
IN_PLACE_MIN_BYTES = 64 << 10
MAX_BUFFERS = 1 << 16  # far beyond any real object graph; bounds the table a peer can claim
_OWN_WRITE_BYTES = 1 << 20  # Parts.write_to: a piece this big gets a write of its own


class CodecError(ValueError):
    """A region whose table does not describe a payload inside it."""


def _align(n: int) -> int:
    return (n + _ALIGN - 1) & ~(_ALIGN - 1)


class _Sink:
    """A write-only file for the pickler that keeps what it is given, by reference: frames as
    ``bytes``, and a big ``bytes`` or ``bytearray`` argument as the object itself. ``write`` is
    the list's own append (the pickler ignores what write returns), so no Python code runs per
    piece."""

    __slots__ = ("write",)

    def __init__(self, chunks: list[Any]) -> None:
        self.write = chunks.append


class Parts:
    """A pickled object not yet in shared memory: its pieces and the region size it needs.
    Held as tuples: a tuple of ``bytes`` leaves the garbage collector's lists at its first
    pass, so a queue of small jobs does not hold it up (see ``futures``)."""

    __slots__ = ("chunks", "buffers", "stream_len", "offsets", "size")

    def __init__(self, chunks: list[Any], stream_len: int, buffers: list[memoryview]) -> None:
        self.chunks: tuple[Any, ...] = tuple(chunks)
        self.buffers: tuple[memoryview, ...] = tuple(buffers)
        self.stream_len = stream_len
        pos = _TABLE.size + _ENTRY.size * len(buffers) + stream_len
        offsets = []
        for buf in buffers:
            pos = _align(pos)
            offsets.append(pos)
            pos += buf.nbytes
        self.offsets: tuple[int, ...] = tuple(offsets)
        self.size = pos

    @property
    def oob_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    @property
    def mutable(self) -> bool:
        """Whether the caller could still change these bytes: any piece that is not a ``bytes``
        object (a bytearray, an array, any out-of-band buffer)."""
        return bool(self.buffers) or any(type(c) is not bytes for c in self.chunks)

    def write_into(self, dst: memoryview) -> None:
        """Copy every piece into ``dst`` (exactly ``self.size`` bytes): the sender's one copy."""
        pos = self._pack_table(dst)
        for chunk in self.chunks:
            n = len(chunk)  # bytes or bytearray: its length is its size
            dst[pos : pos + n] = chunk
            pos += n
        for off, buf in zip(self.offsets, self.buffers):
            dst[off : off + buf.nbytes] = buf

    def write_to(self, segment: Any) -> None:
        """``write_into`` for an unmapped segment (``shm.Segment.write_at``): the same one copy.
        The pickle stream's frames are joined first (a few MiB at most beside the big pieces,
        which go one write each)."""
        small: list[Any] = [self._table()]
        pos = 0
        for chunk in self.chunks:
            if len(chunk) >= _OWN_WRITE_BYTES:
                segment.write_at(pos, b"".join(small))
                pos += sum(map(len, small))
                small = []
                segment.write_at(pos, chunk)
                pos += len(chunk)
            else:
                small.append(chunk)
        segment.write_at(pos, b"".join(small))
        for off, buf in zip(self.offsets, self.buffers):
            segment.write_at(off, buf)

    def _table(self) -> bytearray:
        table = bytearray(_TABLE.size + _ENTRY.size * len(self.buffers))
        self._pack_table(table)
        return table

    def _pack_table(self, dst: Any) -> int:
        """Write the region's table at the start of ``dst``; returns where the stream starts."""
        _TABLE.pack_into(dst, 0, self.stream_len, len(self.buffers), 0)
        pos = _TABLE.size
        for off, buf in zip(self.offsets, self.buffers):
            _ENTRY.pack_into(dst, pos, off, buf.nbytes)
            pos += _ENTRY.size
        return pos

    def release(self) -> None:
        """Drop the references to the caller's objects once they are in shared memory."""
        self.chunks = ()
        self.buffers = ()


class Frozen:
    """A payload already encoded into memory of its own: what a job that must wait keeps, so
    that changing the caller's objects after ``submit()`` never reaches it. ``region`` is a
    private buffer, or the view of a staged ``segment`` that is sent as it is (no second copy)."""

    __slots__ = ("region", "segment", "size", "oob_bytes")

    def __init__(self, region: memoryview, oob_bytes: int, segment: Any = None) -> None:
        self.region = region
        self.segment = segment
        self.size = region.nbytes
        self.oob_bytes = oob_bytes

    def write_into(self, dst: memoryview) -> None:
        dst[: self.size] = self.region

    def write_to(self, segment: Any) -> None:
        segment.write_at(0, self.region)

    def release(self) -> None:
        self.region = memoryview(b"")
        if self.segment is not None:
            self.segment.close()
            self.segment = None


def oob_bytes_of(region: memoryview) -> int:
    """Bytes of out-of-band buffers an encoded region carries (0 when its table is unreadable:
    ``load`` then reports the error)."""
    if region.nbytes < _TABLE.size:
        return 0
    _, nbuf, _ = _TABLE.unpack_from(region, 0)
    if nbuf > MAX_BUFFERS or _TABLE.size + _ENTRY.size * nbuf > region.nbytes:
        return 0
    return sum(_ENTRY.unpack_from(region, _TABLE.size + i * _ENTRY.size)[1] for i in range(nbuf))


def _raw(buf: pickle.PickleBuffer) -> memoryview:
    try:
        return buf.raw()
    except BufferError:  # not contiguous: the one case that needs a copy of its own
        return memoryview(memoryview(buf).tobytes())


def dump(obj: object, pickler: SubprocPickler) -> Parts:
    """Pickle ``obj`` into pieces. Raises whatever the pickler raises for unpicklable input."""
    if has_zero_copy(pickler):
        chunks: list[Any] = []
        buffers: list[memoryview] = []

        def out_of_band(buf: pickle.PickleBuffer) -> bool:
            if len(buffers) >= MAX_BUFFERS:
                return True  # the table is full: this one goes in band (a true answer means so)
            buffers.append(_raw(buf))
            return False

        pickler.make_pickler(_Sink(chunks), out_of_band).dump(obj)  # type: ignore[arg-type]
        return Parts(chunks, sum(map(len, chunks)), buffers)
    data = pickler.dumps(obj)
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"{type(pickler).__qualname__}.dumps() returned {type(data).__name__}, not bytes")
    return Parts([data], len(data), [])


def dump_job(fn: Any, args: tuple[Any, ...], kwargs: Any, pickler: SubprocPickler, max_payload: int | None) -> Parts:
    """Pickle a call ``fn(*args, **kwargs)``; PayloadTooLargeError (naming the job) over ``max_payload``."""
    parts = dump((fn, tuple(args), dict(kwargs or {})), pickler)
    if max_payload is not None and parts.size > max_payload:
        raise PayloadTooLargeError(f"job {describe_job(fn)}", parts.size, max_payload)
    return parts


def load(region: memoryview, pickler: SubprocPickler, *, copy_buffers: bool) -> tuple[object, bool]:
    """Unpickle from a region. Returns the object and whether it still refers into the region
    (out-of-band buffers used in place), in which case the region must outlive it."""
    size = region.nbytes
    if size < _TABLE.size:
        raise CodecError(f"region of {size} bytes is smaller than its table")
    stream_len, nbuf, reserved = _TABLE.unpack_from(region, 0)
    table_end = _TABLE.size + _ENTRY.size * nbuf
    if nbuf > MAX_BUFFERS:
        raise CodecError(f"region table claims {nbuf} out-of-band buffers, over the {MAX_BUFFERS} a peer may send")
    if reserved != 0 or table_end + stream_len > size:
        raise CodecError(f"region table (stream {stream_len}, {nbuf} buffers) does not fit {size} bytes")
    stream_end = table_end + stream_len
    buffers: list[Any] = []
    for i in range(nbuf):
        off, n = _ENTRY.unpack_from(region, _TABLE.size + i * _ENTRY.size)
        if off < stream_end or off + n > size:
            raise CodecError(f"buffer {i} at {off}+{n} lies outside the region")
        view = region[off : off + n]
        buffers.append(copy_out(view) if copy_buffers else view)
    stream = region[table_end:stream_end]
    if has_zero_copy(pickler):
        obj = pickler.loads_from(stream, buffers)
    elif nbuf:
        raise CodecError("out-of-band buffers sent to a pickler without loads_from")
    else:
        # torch's contract: loads(bytes). A view of shared memory would break a pickler that
        # calls bytes methods, and one that keeps views of its input would see later jobs'
        # bytes once the region is reused: give it bytes of its own (one more copy).
        obj = pickler.loads(stream.tobytes())
    return obj, bool(buffers) and not copy_buffers

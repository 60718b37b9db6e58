"""How a job or a result crosses Ray's object store: its pickle pieces, big ones out of band.

Ray serializes a value with pickle protocol 5 and stores every ``PickleBuffer`` it meets out of
band, in the node's shared-memory object store; a reader on the same node gets each one back as
a read-only view of that store (no copy), a reader on another node after Ray's node-to-node
transfer. So a pickled job is handed to Ray as its pieces, never as one ``bytes``::

    (chunks,  [b"<small pickle frames>", PickleBuffer(<a big bytes object>), b"<frames>", ...],
     buffers, [PickleBuffer(<numpy data>), ...])           # pickle-5 out-of-band buffers

``codec.dump`` already leaves a large ``bytes`` as a chunk of its own (the C pickler writes it
to the sink by reference), so a 128 MiB ``bytes`` argument becomes one ``PickleBuffer`` over the
caller's own object and Ray's put is the only copy on the way in. The reader unpickles from a
file over the chunks: a big ``bytes`` is rebuilt by one ``readinto`` from the store's mapping
(that copy makes the object the job receives); out-of-band buffers are used in place
(arguments: numpy arrays view the store) or copied once (results, which must not pin the store).
"""
from __future__ import annotations

import pickle
from collections.abc import Sequence
from typing import Any

from ..codec import Parts
from ..pages import advise_huge, copy_out
from ..pickler import SubprocPickler, has_zero_copy

# A pickle chunk this big travels as its own out-of-band buffer; smaller ones (pickle frames
# are 64 KiB at most) are joined into one in-band bytes, where a copy costs nothing worth saving.
OOB_CHUNK = 64 << 10

Wire = tuple[list[Any], list[Any]]  # (chunks of the pickle stream, out-of-band buffers)


def to_wire(parts: Parts) -> Wire:
    """The pieces of ``parts`` as Ray should see them. Copies only the small chunks."""
    chunks: list[Any] = []
    small: list[memoryview] = []
    for chunk in parts.chunks:
        if len(chunk) >= OOB_CHUNK:
            if small:
                chunks.append(b"".join(small))
                small = []
            chunks.append(pickle.PickleBuffer(chunk))
        else:
            small.append(chunk)
    if small:
        chunks.append(b"".join(small))
    return chunks, [pickle.PickleBuffer(b) for b in parts.buffers]


class ChunkFile:
    """A read-only file over a pickle stream in pieces, for ``pickle.Unpickler``.

    The unpickler reads frames (small) with ``read`` and allocates a large ``bytes`` before
    filling it with ``readinto``: that is the one copy of a big in-band object, and it may land
    on huge pages (see ``pages``).
    """

    __slots__ = ("_chunks", "_index", "_pos")

    def __init__(self, chunks: Sequence[Any]) -> None:
        self._chunks = [memoryview(c).cast("B") if memoryview(c).format != "B" else memoryview(c) for c in chunks]
        self._index = 0
        self._pos = 0

    def readinto(self, dest: Any) -> int:
        dest = memoryview(dest).cast("B")
        advise_huge(dest)
        done = 0
        while done < dest.nbytes and self._index < len(self._chunks):
            chunk = self._chunks[self._index]
            n = min(dest.nbytes - done, chunk.nbytes - self._pos)
            dest[done : done + n] = chunk[self._pos : self._pos + n]
            done += n
            self._pos += n
            if self._pos == chunk.nbytes:
                self._index += 1
                self._pos = 0
        return done

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = sum(c.nbytes for c in self._chunks[self._index :]) - self._pos
        if self._index < len(self._chunks) and self._pos + n <= self._chunks[self._index].nbytes:
            data = self._chunks[self._index][self._pos : self._pos + n].tobytes()
            self._pos += n
            if self._pos == self._chunks[self._index].nbytes:
                self._index += 1
                self._pos = 0
            return data
        out = bytearray(n)
        return bytes(out[: self.readinto(out)])

    def readline(self) -> bytes:
        # Only text opcodes (protocols 0-3) read lines; shmpool's picklers write protocol 5.
        line = bytearray()
        while not line.endswith(b"\n"):
            byte = self.read(1)
            if not byte:
                break
            line += byte
        return bytes(line)


def from_wire(wire: Wire, pickler: SubprocPickler, *, copy_buffers: bool) -> Any:
    """Unpickle what ``to_wire`` made, as Ray handed it back. Raises what the unpickler raises."""
    chunks, buffers = wire
    views: list[Any] = [memoryview(b) for b in buffers]
    if copy_buffers:
        views = [copy_out(v.cast("B") if v.format != "B" else v) for v in views]
    if has_zero_copy(pickler):
        return pickle.Unpickler(ChunkFile(chunks), buffers=views).load()
    if views:
        raise ValueError("out-of-band buffers sent to a pickler without loads_from")
    return pickler.loads(b"".join(memoryview(c) for c in chunks))

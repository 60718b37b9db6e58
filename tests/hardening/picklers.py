"""Picklers for the shmpool hardening tests that follow torch's ``SubprocPickler`` contract only:
``dumps(obj) -> bytes`` and ``loads(data: bytes)``, nothing of shmpool's zero-copy hooks.

A module of its own next to ``jobs.py`` so the workers can import it by name (the pool pickles the
pickler instance and every worker unpickles it; hardutil.py puts this folder on PYTHONPATH).
Test-only: nothing here belongs in the package.
"""
from __future__ import annotations

import pickle
import struct

from shmpool import SubprocPickler


class StrictPickler(SubprocPickler):
    """torch's contract, checked: ``loads`` is documented to take ``bytes``, and this one relies on it
    (``bytes.startswith``; a memoryview has no such method)."""

    MAGIC = b"V1"

    def dumps(self, obj):
        return self.MAGIC + pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)

    def loads(self, data):
        if not isinstance(data, bytes):
            raise TypeError(f"StrictPickler.loads got {type(data).__name__}, not bytes (torch's contract)")
        if not data.startswith(self.MAGIC):
            raise ValueError("StrictPickler.loads: bad magic")
        return pickle.loads(data[len(self.MAGIC):])


class ZeroCopyPickler(SubprocPickler):
    """torch's contract (dumps -> bytes, loads(data: bytes)) with a zero-copy loads: PEP 574
    out-of-band buffers travel after the pickle stream and the arrays it rebuilds *view* ``data``.
    That is safe exactly when ``data`` is an immutable ``bytes`` that nobody else reuses."""

    def dumps(self, obj):
        bufs = []
        head = pickle.dumps(obj, protocol=5, buffer_callback=bufs.append)
        raws = [b.raw() for b in bufs]
        out = struct.pack("<II", len(head), len(raws)) + b"".join(struct.pack("<Q", r.nbytes) for r in raws) + head
        return out + b"".join(bytes(r) for r in raws)

    def loads(self, data):
        n, k = struct.unpack_from("<II", data, 0)
        sizes = [struct.unpack_from("<Q", data, 8 + 8 * i)[0] for i in range(k)]
        pos = 8 + 8 * k
        mv = memoryview(data)
        head = mv[pos:pos + n]
        pos += n
        bufs = []
        for s in sizes:
            bufs.append(mv[pos:pos + s])
            pos += s
        return pickle.loads(head, buffers=bufs)

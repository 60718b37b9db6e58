"""Memory the receiver copies a big payload into: ask for transparent huge pages first.

A fresh 128 MiB allocation is faulted in 4 KiB at a time while the copy first writes it: 32,768
faults that cost more than the copy itself (85 ms against 20 ms for 128 MiB on the 2-core VM
this was measured on). With ``MADV_HUGEPAGE`` on the still-untouched range, the kernel maps it
2 MiB at a time. This only works before the first write, so shmpool advises the destination
at the moment it is allocated and still empty: out-of-band buffers it allocates itself, and
large ``bytes`` the unpickler allocates and then fills through ``RegionFile.readinto``.

Advice only: where transparent huge pages are off (``/sys/kernel/mm/transparent_hugepage``
set to ``never``) or madvise fails, the copy goes on with small pages.
"""
from __future__ import annotations

import ctypes
import mmap

HUGE_COPY_BYTES = 4 << 20  # below this the faults cost little and a huge page may not fit
_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)

try:
    _madvise = ctypes.CDLL(None, use_errno=True).madvise
    _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    _madvise.restype = ctypes.c_int
except (OSError, AttributeError):  # not Linux/glibc: no advice, same results
    _madvise = None


def advise_huge(dest: memoryview) -> None:
    """Advise huge pages for the 2 MiB-aligned interior of ``dest``, a writable, untouched buffer."""
    size = dest.nbytes
    if _madvise is None or size < HUGE_COPY_BYTES or dest.readonly:
        return
    addr = ctypes.addressof(ctypes.c_char.from_buffer(dest))
    start = (addr + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
    end = (addr + size) & ~(_HUGE_PAGE - 1)
    if end > start:
        _madvise(start, end - start, _MADV_HUGEPAGE)


def copy_out(src: memoryview) -> bytearray:
    """A private copy of ``src`` (a result's out-of-band buffer, which outlives its slot)."""
    dest = bytearray(src.nbytes)  # calloc: a big one is fresh, untouched zero pages
    view = memoryview(dest)
    advise_huge(view)
    view[:] = src
    return dest


class RegionFile:
    """A read-only file over a region, for ``pickle.Unpickler``.

    ``pickle.loads`` on a memoryview copies a large ``bytes`` straight into memory it has just
    allocated, with no chance to advise it. Given a file, the unpickler allocates the object and
    then calls ``readinto`` with it, still untouched: the one copy then lands on huge pages.
    Small reads (whole pickle frames, 64 KiB at most) are plain slices.
    """

    __slots__ = ("_view", "_pos")

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        end = self._view.nbytes if n is None or n < 0 else min(self._pos + n, self._view.nbytes)
        data = self._view[self._pos : end].tobytes()
        self._pos = end
        return data

    def readinto(self, dest: memoryview) -> int:
        n = min(dest.nbytes, self._view.nbytes - self._pos)
        target = dest[:n] if n < dest.nbytes else dest
        advise_huge(target)
        target[:] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def readline(self) -> bytes:
        # Only text opcodes (protocols 0-3) read lines; shmpool's picklers write protocol 5.
        pos, end = self._pos, self._view.nbytes
        while pos < end:
            chunk = self._view[pos : pos + 4096].tobytes()
            i = chunk.find(b"\n")
            if i >= 0:
                return self.read(pos + i + 1 - self._pos)
            pos += len(chunk)
        return self.read()

"""Shared-memory segments and semaphores: the OS objects shmpool creates, and how they die.

Segments are memfds, never files in /dev/shm: they have no name, so nothing can be left behind
by a SIGKILL; the memory goes back when the last process holding an fd or mapping exits. A
segment reaches another process only as a file descriptor (inherited at spawn, or SCM_RIGHTS).

Semaphores live inside the segments too (semaphores.py), so shmpool puts nothing in /dev/shm.
Earlier versions used named semaphores there (``sem.shmp.<creator pid>.<random>``) and a
SIGKILL during a worker's start could leave two behind: ``sweep_stale`` removes this user's
whose creator is dead, on each pool start.
"""
from __future__ import annotations

import ctypes
import errno
import gc
import mmap
import os
import resource

from typing import Any


NAME_PREFIX = "shmp."  # earlier versions' semaphores in /dev/shm: "sem.shmp.<pid>.<random>"
_DEV_SHM = "/dev/shm"


class SharedMemoryError(MemoryError):
    """Shared memory could not be had: names the size asked for and what the system had left."""


def _meminfo(field: str) -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1


def mem_available() -> int:
    """The kernel's estimate of memory available without swapping, in bytes; -1 if unknown."""
    return _meminfo("MemAvailable:")


def mem_total() -> int:
    return _meminfo("MemTotal:")


class Segment:
    """One memfd and its mapping of its first ``size`` bytes. ``close()`` is idempotent and
    safe on a half-built object."""

    fd: int = -1
    size: int = 0
    _map: mmap.mmap | None = None
    view: memoryview | None = None

    def __init__(self, fd: int, size: int, *, populate: bool = False, mapped: bool = True) -> None:
        """Map ``fd`` (unless not ``mapped``: ``ensure`` maps it later), taking ownership of it:
        on failure the fd is closed here, exactly once, so a caller never closes it again (a
        second close could hit another thread's file)."""
        self.fd = fd
        self.size = size
        if not mapped:
            return
        try:
            self._map_first(size, populate)
        except BaseException:
            self.close()
            raise

    def _map_first(self, size: int, populate: bool) -> None:
        self.size = size
        try:
            flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
            # A zero-length mapping is an error; keep one page so empty segments still work.
            self._map = mmap.mmap(self.fd, max(size, 1), flags=flags)
            self.view = memoryview(self._map)[:size]
        except OSError as e:
            raise SharedMemoryError(_map_failure(size, e)) from e

    @classmethod
    def create(cls, size: int, *, reserve: bool = False, label: str = "shmpool", mapped: bool = True) -> "Segment":
        """A new memfd of ``size`` bytes. ``reserve`` allocates every page now, so running out of
        memory is a clear error here instead of a SIGBUS on first touch. Not ``mapped``: for a
        payload written through ``write_at`` (which allocates each page as it fills it)."""
        try:
            fd = os.memfd_create(label, os.MFD_CLOEXEC)
        except OSError as e:
            raise SharedMemoryError(f"could not create a shared-memory segment of {size:,} bytes ({e.strerror})") from e
        try:
            os.ftruncate(fd, max(size, 1))
            if reserve and size:
                os.posix_fallocate(fd, 0, size)
        except BaseException as e:
            os.close(fd)
            if isinstance(e, OSError):
                raise SharedMemoryError(
                    f"could not reserve {size:,} bytes of shared memory ({e.strerror}); "
                    f"MemAvailable is {mem_available():,} bytes: free memory or lower the payload"
                ) from e
            raise
        return cls(fd, size, populate=reserve, mapped=mapped)  # owns fd from here on

    def write_at(self, offset: int, data: Any) -> None:
        """Write ``data`` (any buffer) at ``offset`` through the file, not a mapping: into fresh
        pages this is about twice as fast as a mapping would be (the kernel fills each page as it
        allocates it instead of zeroing it on the first fault, then copying), and running out of
        memory is a clear error here, never a SIGBUS."""
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < view.nbytes:
                done += os.pwrite(self.fd, view[done:], offset + done)
        except OSError as e:
            raise SharedMemoryError(
                f"could not write {view.nbytes:,} bytes into shared memory ({e.strerror}); "
                f"MemAvailable is {mem_available():,} bytes: free memory or lower the payload"
            ) from e

    @classmethod
    def attach(cls, fd: int, *, populate: bool = False, length: int | None = None) -> "Segment":
        """Map a segment received from a peer (its first ``length`` bytes, if given, else all of
        it); takes ownership of ``fd``."""
        try:
            size = os.fstat(fd).st_size if length is None else length
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, size, populate=populate)  # owns fd from here on

    def ensure(self, size: int) -> None:
        """Make the mapping cover at least ``size`` bytes, growing the memfd (every new page
        allocated now) if it is shorter. The pages it had stay as they were: warm."""
        if self._map is not None and self.size >= size:
            return
        try:
            have = os.fstat(self.fd).st_size
            if have < size:
                os.ftruncate(self.fd, size)
                os.posix_fallocate(self.fd, have, size - have)
        except OSError as e:
            raise SharedMemoryError(
                f"could not grow a shared-memory segment to {size:,} bytes ({e.strerror}); "
                f"MemAvailable is {mem_available():,} bytes"
            ) from e
        self.unmap()
        self._map_first(max(size, have), populate=True)

    def unmap(self, *, full_collection: bool = True) -> bool:
        """Drop the mapping, keeping the fd. False when views of it are still alive (a job kept
        an array): the mapping then lives on until they die, and the pages must not be reused.
        Without ``full_collection`` only the young generations are collected before that answer;
        a False answer is then provisional: the mapping is held, and a later ``unmap()`` gives
        the final one (worker.py runs that full collection after the job's reply is out)."""
        if self.view is not None:
            self.view.release()
            self.view = None
        clean = True
        if self._map is not None:
            clean = _close_map(self._map, full_collection)
            if clean or full_collection:
                self._map = None
        return clean

    def close(self) -> None:
        # A view a job still holds (a numpy array argument it kept) keeps the mapping alive
        # until it dies: safe, as long as the pages are never reused (see unmap()).
        self.unmap()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _close_map(mapping: mmap.mmap, full_collection: bool = True) -> bool:
    """Unmap; False when views of it are still alive (the mapping then lives until they die).
    Views a job dropped can still be held by reference cycles (an ``nn.Module``'s, a graph's)
    until the cyclic collector runs: run it before concluding the job kept them, the young
    generations first (a millisecond), then, with ``full_collection``, all (tens of ms with
    torch loaded), which still costs less than copying the region away or a fresh segment."""
    for generation in (None, 1, 2) if full_collection else (None, 1):
        if generation is not None:
            gc.collect(generation)
        try:
            mapping.close()
            return True
        except BufferError:
            pass
    return False


def out_of_fds() -> str:
    """Why an fd could not be had, with the fix (for errors that name it)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return (f"this process is out of file descriptors (RLIMIT_NOFILE is {soft}): raise the limit "
            "(`ulimit -n`, resource.setrlimit) or close files it no longer needs")


def _map_failure(size: int, e: OSError) -> str:
    if e.errno == errno.ENOMEM:
        hint = ("the process's address space is exhausted (RLIMIT_AS / ulimit -v) or memory is short: "
                "raise the limit or send a smaller payload")
    elif e.errno in (errno.EMFILE, errno.ENFILE):
        hint = out_of_fds()
    else:
        hint = "the descriptor cannot be mapped"
    return f"could not map {size:,} bytes of shared memory ({e.strerror}); {hint}"


class RegionMapping:
    """One job's own mapping of a region of a segment, for arguments it uses in place.

    The job's arrays view this mapping, not the ring's, so the ring can reuse the region once
    the job is over even if the job kept a view (in a global, a cache): ``close()`` then moves
    those pages to private memory holding the same bytes, at the same address, and the kept
    views go on seeing the job's own data, never a later job's.
    """

    _map: mmap.mmap | None = None
    view: memoryview | None = None

    def __init__(self, fd: int, offset: int, size: int) -> None:
        base = offset - offset % mmap.ALLOCATIONGRANULARITY
        delta = offset - base
        self._length = delta + size
        try:
            self._map = mmap.mmap(fd, self._length, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, offset=base)
        except OSError as e:
            raise SharedMemoryError(_map_failure(size, e)) from e
        anchor = ctypes.c_char.from_buffer(self._map)  # an export: dropped on the next line
        self._addr = ctypes.addressof(anchor)
        del anchor
        self.view = memoryview(self._map)[delta : delta + size]

    def close(self) -> bool:
        """Unmap; True when views outlived the job and were moved to private memory. Raises
        SharedMemoryError when they could not be (the region must then never be reused)."""
        if self.view is not None:
            self.view.release()
            self.view = None
        if self._map is None:
            return False
        if not _close_map(self._map):
            _privatize(self._addr, self._length)
            self._map = None  # its munmap, when the last view dies, frees the private pages
            return True
        self._map = None
        return False


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.mremap.restype = ctypes.c_void_p
_libc.mremap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_MAP_FAILED = ctypes.c_void_p(-1).value
_MREMAP_MAYMOVE, _MREMAP_FIXED = 1, 2


def _privatize(addr: int, length: int) -> None:
    """Replace the pages at [addr, addr+length) with anonymous private pages holding the same
    bytes: copy into a fresh mapping, then mremap it over the old one in one atomic step."""
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    fresh = _libc.mmap(None, length, prot, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if fresh is None or fresh == _MAP_FAILED:
        err = ctypes.get_errno()
        raise SharedMemoryError(f"could not copy {length:,} bytes a job kept a view of ({os.strerror(err)})")
    ctypes.memmove(fresh, addr, length)
    moved = _libc.mremap(fresh, length, length, _MREMAP_MAYMOVE | _MREMAP_FIXED, addr)
    if moved is None or moved == _MAP_FAILED:
        err = ctypes.get_errno()
        _libc.munmap(fresh, length)
        raise SharedMemoryError(f"could not move {length:,} bytes a job kept a view of ({os.strerror(err)})")


def sweep_stale() -> int:
    """Unlink named semaphores that this user's dead shmpool processes of earlier versions left
    behind (this one names none: semaphores.py). Returns how many. Never raises: an entry of
    another user, or one that cannot be removed, is left alone."""
    removed = 0
    prefix = "sem." + NAME_PREFIX
    try:
        entries = os.listdir(_DEV_SHM)
    except OSError:
        return 0
    uid = os.getuid()
    for entry in entries:
        if not entry.startswith(prefix):
            continue
        try:
            pid = int(entry[len(prefix) :].split(".", 1)[0])
            if pid == os.getpid() or _pid_alive(pid) or os.stat(os.path.join(_DEV_SHM, entry)).st_uid != uid:
                continue
            os.unlink(os.path.join(_DEV_SHM, entry))  # what sem_unlink does
        except (ValueError, OSError):
            continue  # not ours to remove, or gone already
        removed += 1
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

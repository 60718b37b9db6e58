"""Shared-memory segments and semaphores: the OS objects shmpool creates, and how they die.

Segments are memfds, never files in /dev/shm: they have no name, so nothing can be left behind
by a SIGKILL; the memory goes back when the last process holding an fd or mapping exits. A
segment reaches another process only as a file descriptor (inherited at spawn, or SCM_RIGHTS).

Semaphores are POSIX named semaphores (posix_ipc). A name exists in /dev/shm only from the
parent's ``create`` until the worker has opened it and called ``unlink`` (the first thing a
worker does after reading its INIT), so a kill leaves at most the semaphores of a worker that
was still starting; ``sweep_stale`` removes those on the next pool start. Names carry the
creator's pid so stale ones can be told from live ones, and 64 random bits so nobody can guess
them; mode 0600 keeps other users out.
"""
from __future__ import annotations

import mmap
import os
import secrets

import posix_ipc

NAME_PREFIX = "shmp."  # everything of ours in /dev/shm is "sem.shmp.*"
_DEV_SHM = "/dev/shm"
_MODE = 0o600


class SharedMemoryError(MemoryError):
    """Shared memory could not be had: names the size asked for and what the system had left."""


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1


class Segment:
    """One memfd and its mapping. ``close()`` is idempotent and safe on a half-built object."""

    fd: int = -1
    size: int = 0
    _map: mmap.mmap | None = None
    view: memoryview | None = None

    def __init__(self, fd: int, size: int, *, populate: bool = False) -> None:
        self.fd = fd
        self.size = size
        try:
            flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
            # A zero-length mapping is an error; keep one page so empty segments still work.
            self._map = mmap.mmap(fd, max(size, 1), flags=flags)
            self.view = memoryview(self._map)[:size]
        except BaseException:
            self.close()
            raise

    @classmethod
    def create(cls, size: int, *, reserve: bool = False, label: str = "shmpool") -> "Segment":
        """A new memfd of ``size`` bytes. ``reserve`` allocates every page now, so running out of
        memory is a clear error here instead of a SIGBUS on first touch."""
        try:
            fd = os.memfd_create(label, os.MFD_CLOEXEC)
        except OSError as e:
            raise SharedMemoryError(f"could not create a shared-memory segment of {size:,} bytes ({e.strerror})") from e
        try:
            try:
                os.ftruncate(fd, max(size, 1))
                if reserve and size:
                    os.posix_fallocate(fd, 0, size)
                return cls(fd, size, populate=reserve)
            except OSError as e:
                raise SharedMemoryError(
                    f"could not reserve {size:,} bytes of shared memory ({e.strerror}); "
                    f"MemAvailable is {_mem_available():,} bytes: free memory or lower the payload"
                ) from e
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int, *, populate: bool = False) -> "Segment":
        """Map a segment received from a peer; takes ownership of ``fd``."""
        try:
            size = os.fstat(fd).st_size
            return cls(fd, size, populate=populate)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        if self.view is not None:
            self.view.release()
            self.view = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                # A job still holds a view (e.g. a numpy array argument it kept); the mapping
                # lives on until that view dies, which is safe, just later.
                pass
            self._map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def new_semaphore_name() -> str:
    return f"/{NAME_PREFIX}{os.getpid()}.{secrets.token_hex(8)}"


def create_semaphore(name: str) -> posix_ipc.Semaphore:
    try:
        return posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=_MODE, initial_value=0)
    except OSError as e:
        # A semaphore is a one-page file in /dev/shm: the only place shmpool needs space there.
        raise SharedMemoryError(
            f"could not create semaphore {name} ({e.strerror}): it needs one page "
            f"({mmap.PAGESIZE:,} bytes) in {_DEV_SHM}, which has {_free_bytes(_DEV_SHM):,} bytes free; "
            f"free space in {_DEV_SHM} (shmpool needs two pages per starting worker)"
        ) from e


def _free_bytes(path: str) -> int:
    try:
        st = os.statvfs(path)
    except OSError:
        return -1
    return st.f_bavail * st.f_frsize


def open_and_unlink_semaphore(name: str) -> posix_ipc.Semaphore:
    """Open the semaphore a parent made for us, then remove its name: from here on only the two
    processes that hold it can reach it, and it vanishes with them."""
    sem = posix_ipc.Semaphore(name)
    unlink_semaphore(name)
    return sem


def unlink_semaphore(name: str) -> None:
    try:
        posix_ipc.unlink_semaphore(name)
    except posix_ipc.ExistentialError:
        pass  # the peer unlinked it first


def sweep_stale() -> int:
    """Unlink semaphores left by shmpool processes that no longer exist. Returns how many."""
    removed = 0
    try:
        entries = os.listdir(_DEV_SHM)
    except OSError:
        return 0
    for entry in entries:
        if not entry.startswith("sem." + NAME_PREFIX):
            continue
        try:
            pid = int(entry[len("sem." + NAME_PREFIX) :].split(".", 1)[0])
        except ValueError:
            continue
        if pid == os.getpid() or _pid_alive(pid):
            continue
        unlink_semaphore("/" + entry[len("sem.") :])
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

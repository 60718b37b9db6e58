"""Starting processes: SPAWN workers and the fork helper are fresh interpreters; FORK workers
are forked by the helper. Only the pool's dispatcher thread calls into this module: Linux's
PDEATHSIG fires when the *thread* that started a child exits, and the dispatcher thread lives
exactly as long as the workers should. Every process the pool owns is watched through a pidfd,
which becomes readable the moment the process exits, whoever else holds its sockets."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

from . import wire
from .channel import send_header

_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # Workers build a fresh bytes object for every large argument; with transparent huge pages
    # for malloc'd blocks that costs one fault per 2 MiB instead of per 4 KiB (about 3x faster
    # for 64 MiB here). glibc >= 2.35 reads this; older ones ignore it. A caller's own setting wins.
    env.setdefault("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    return env


def _python(entry: str, args: list[str], pass_fds: tuple[int, ...]) -> subprocess.Popen:
    # -c rather than -m: shmpool must import in the child even when the caller runs it from a
    # source tree that is on its sys.path but not installed.
    code = f"import sys; sys.path.insert(0, {_PACKAGE_PARENT!r}); {entry}"
    return subprocess.Popen([sys.executable, "-c", code, *args], pass_fds=pass_fds, close_fds=True, env=_child_env())


def spawn_worker(sock_fd: int, request_fd: int, response_fd: int) -> subprocess.Popen:
    fds = (sock_fd, request_fd, response_fd)
    return _python(
        "from shmpool.worker import spawn_main; spawn_main()",
        [*(str(fd) for fd in fds), str(os.getpid())],
        fds,
    )


class ForkHelper:
    """The parent's handle on the fork helper process (see forkserver.py)."""

    def __init__(self, preload: tuple[str, ...]) -> None:
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = _python(
                "from shmpool.forkserver import main; main()",
                [str(child_sock.fileno()), str(os.getpid()), ",".join(preload)],
                (child_sock.fileno(),),
            )
        except BaseException:
            parent_sock.close()
            raise
        finally:
            child_sock.close()
        parent_sock.setblocking(False)
        self.sock = parent_sock
        self.pidfd = os.pidfd_open(self.proc.pid)  # our child, not yet reaped: cannot be reused

    @property
    def pid(self) -> int:
        return self.proc.pid

    def fork(self, serial: int, fds: tuple[int, int, int]) -> None:
        send_header(self.sock, wire.encode(wire.MsgKind.FORK, serial), fds)

    def close(self, wait: float) -> None:
        """Closing our end makes the helper exit, and its workers with it (PDEATHSIG)."""
        self.sock.close()
        stop_process(self.proc, wait)
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def stop_process(proc: subprocess.Popen, wait: float, term_wait: float | None = None) -> int:
    """Wait up to ``wait`` seconds for ``proc`` to exit; then SIGTERM and ``term_wait`` more
    seconds if given; then SIGKILL. Bounded; returns the exit code (negative: a signal)."""
    try:
        return proc.wait(wait)
    except subprocess.TimeoutExpired:
        pass
    if term_wait is not None:
        proc.terminate()
        try:
            return proc.wait(term_wait)
        except subprocess.TimeoutExpired:
            pass
    proc.kill()
    return proc.wait()

"""The fork helper: a small, single-threaded, fresh interpreter that forks FORK-kind workers.

Forking the caller would copy a big, threaded process (torch.compile's) and whatever locks its
other threads held; forking this helper copies a clean interpreter with shmpool (and any
``preload`` modules) already imported, so a worker starts in milliseconds. The helper reaps its
children and tells the parent how each one ended (REAPED), since only a parent can wait.

    parent --FORK(serial) + fds[socket, request ring, response ring]--> helper
    parent <--FORKED(serial, pid) + fds[pidfd]-- helper
    parent <--REAPED(serial, pid, status)-- helper

The pidfd lets the parent see the worker's exit itself, at once and whoever else holds the
worker's socket (a grandchild a job forked does), though only the helper can reap it.
"""
from __future__ import annotations

import importlib
import os
import selectors
import signal
import socket
import sys

from . import wire
from .channel import recv_header, send_header
from .worker import die_with_parent, run


def _fork_worker(ctrl: socket.socket, selector: selectors.BaseSelector, serial: int, fds: list[int]) -> None:
    sock_fd, request_fd, response_fd = fds
    helper_pid = os.getpid()
    pid = os.fork()
    if pid == 0:
        # In the child: drop every fd of the helper's that is not ours, then become a worker.
        for key in list(selector.get_map().values()):
            if key.data is not None:
                os.close(key.fd)  # pidfds of earlier workers
        selector.close()
        ctrl.close()
        run(sock_fd, request_fd, response_fd, helper_pid)
    for fd in fds:
        os.close(fd)
    pidfd = os.pidfd_open(pid)  # before any wait of ours: the pid cannot have been reused
    selector.register(pidfd, selectors.EVENT_READ, (serial, pid))
    send_header(ctrl, wire.encode(wire.MsgKind.FORKED, serial, pid), (pidfd,))


def serve(ctrl_fd: int, parent_pid: int, preload: list[str]) -> None:
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.set_inheritable(ctrl_fd, False)
    for name in preload:
        try:
            importlib.import_module(name)
        except Exception as e:  # a failed preload only costs start-up time later
            print(f"shmpool fork helper: could not preload {name}: {e}", file=sys.stderr)
    ctrl = socket.socket(fileno=ctrl_fd)
    selector = selectors.DefaultSelector()
    selector.register(ctrl, selectors.EVENT_READ, None)
    while True:
        for key, _ in selector.select():
            if key.data is None:
                got = recv_header(ctrl)
                if got is None:
                    return  # parent gone or shutting down; children die with us (PDEATHSIG)
                header, fds = got
                if header.kind != wire.MsgKind.FORK or len(fds) != 3:
                    for fd in fds:
                        os.close(fd)
                    raise wire.WireError(f"fork helper got {header.kind.name} with {len(fds)} fds")
                _fork_worker(ctrl, selector, header.job_id, fds)
            else:
                serial, pid = key.data
                selector.unregister(key.fd)
                os.close(key.fd)
                _, status = os.waitpid(pid, 0)
                send_header(ctrl, wire.encode(wire.MsgKind.REAPED, serial, pid, status))


def main() -> None:
    ctrl_fd, parent_pid = int(sys.argv[1]), int(sys.argv[2])
    preload = [m for m in sys.argv[3].split(",") if m] if len(sys.argv) > 3 else []
    code = 0
    try:
        serve(ctrl_fd, parent_pid, preload)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the parent closed our socket (shutdown, or it died): nobody left to tell
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    os._exit(code)

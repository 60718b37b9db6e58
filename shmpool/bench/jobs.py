"""Job functions the benchmark sends to workers.

They live at module level in a module that imports nothing heavy, so every pool under test
(spawn or fork, torch's sidecar included) can import them by reference and a spawn worker
pays no start-up cost for numpy or torch until a workload needs them.
"""
from __future__ import annotations

import time


def echo(obj):
    """Return the argument unchanged: N bytes in, the same N bytes back."""
    return obj


def consume(data) -> int:
    """Big argument, small result: touch the payload's ends and return its length."""
    return len(data)


def produce(nbytes: int) -> bytes:
    """Small argument, big result: ``nbytes`` of non-zero bytes.

    ``b"\\x01" * n`` writes every page; ``bytes(n)`` would hand back lazily mapped zero pages
    that cost nothing to read and flatter whoever copies them.
    """
    return b"\x01" * nbytes


def warm_import(modules: tuple[str, ...], hold_s: float = 0.0) -> int:
    """Import ``modules`` in the worker (so the first timed job does not pay for it).

    ``hold_s`` keeps this worker busy for a moment, so that a burst of warm-up jobs spreads
    over every worker of the pool instead of landing on the first idle one again and again.
    """
    import importlib
    import os

    for name in modules:
        importlib.import_module(name)
    if hold_s:
        time.sleep(hold_s)
    return os.getpid()


def timed_call(fn, *args, **kwargs):
    """Run ``fn`` and return ``(result, start, end)`` on CLOCK_MONOTONIC.

    That clock is one system-wide clock on Linux, so the parent can subtract its own submit
    and resolve times from these: the IPC cost of a job on either side of it
    (scripts/fx_ipc_timing.py).
    """
    start = time.clock_gettime(time.CLOCK_MONOTONIC)
    result = fn(*args, **kwargs)
    return result, start, time.clock_gettime(time.CLOCK_MONOTONIC)


def fx_summary(gm) -> tuple[int, int]:
    """Unpickled in the worker by the pool: report node count and parameter bytes."""
    nodes = len(gm.graph.nodes)
    nbytes = sum(p.numel() * p.element_size() for p in gm.parameters())
    nbytes += sum(b.numel() * b.element_size() for b in gm.buffers())
    return nodes, nbytes

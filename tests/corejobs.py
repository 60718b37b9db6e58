"""Job functions for the core tests. Module-level so both kinds of worker can import them (the
pool passes its sys.path on, which is how a test folder's module reaches a SPAWN worker)."""
from __future__ import annotations

import hashlib
import os
import time
from typing import Any

import numpy as np

RESULT_TIMEOUT = 60.0  # seconds any one future may take on a loaded 2-core machine


def echo(x: Any) -> Any:
    return x


def add(a: int, b: int, *, scale: int = 1) -> int:
    return (a + b) * scale


def pid() -> int:
    return os.getpid()


def sleep_then(seconds: float, value: Any = None) -> Any:
    time.sleep(seconds)
    return value


def mark_then_sleep(marker: str, seconds: float) -> None:
    """Create ``marker`` (the job has started), then sleep."""
    with open(marker, "w"):
        pass
    time.sleep(seconds)


def boom_holding(a: np.ndarray) -> None:
    """Raise while a local still views the argument (an in-place view into the request slot)."""
    view = a[:10]
    raise ValueError(f"no good, first {view[0]}")


def boom(message: str) -> None:
    raise ValueError(message)


def exit_now(code: int) -> None:
    os._exit(code)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_bytes(n: int) -> bytes:
    return os.urandom(n)


def array_info(a: np.ndarray) -> dict[str, Any]:
    """How the worker received an array: owning its memory, or viewing someone else's."""
    return {"owndata": bool(a.flags.owndata), "sum": float(a.sum()), "shape": a.shape, "dtype": str(a.dtype)}


def double(a: np.ndarray) -> np.ndarray:
    return a * 2


def getenv(name: str) -> str | None:
    return os.environ.get(name)


def unpicklable_result() -> Any:
    import threading

    return threading.Lock()


def hold_memory(nbytes: int) -> int:
    global _held
    _held = bytearray(nbytes)
    _held[::4096] = b"x" * len(_held[::4096])  # touch every page so it counts in RSS
    return os.getpid()


_held: bytearray | None = None


def set_env(name: str, value: str) -> None:
    """An initializer: leaves a trace each worker start."""
    os.environ[name] = value


def failing_initializer() -> None:
    raise RuntimeError("initializer says no")


def pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


_kept: list[Any] = []


def keep_argument(a: np.ndarray) -> str:
    """Keep a reference to the (in-place) argument past the job; return its digest."""
    _kept.append(a)
    return hashlib.sha256(a.tobytes()).hexdigest()


def kept_digests() -> list[str]:
    return [hashlib.sha256(a.tobytes()).hexdigest() for a in _kept]


def grow(data: bytes, times: int) -> bytes:
    return data * times


class _Cycle:
    def __init__(self, a: np.ndarray) -> None:
        self.me = self
        self.a = a


class _SlowFinalizer:
    """Marks, after a delay, that the cyclic collector has freed the cycle it belongs to."""

    def __init__(self, marker: str, delay: float) -> None:
        self.marker = marker
        self.delay = delay

    def __del__(self) -> None:
        time.sleep(self.delay)
        with open(self.marker, "w") as f:
            f.write("collected")


def hold_in_an_old_cycle(a: np.ndarray, marker: str, delay: float) -> int:
    """Leave the (in-place) argument referenced only by a cycle that has reached the oldest
    generation, as a big FX graph's module does after a long job: only a full collection
    frees it, and that collection (slowed down here by a finalizer) marks ``marker``."""
    import gc

    cycle = _Cycle(a)
    cycle.finalizer = _SlowFinalizer(marker, delay)  # type: ignore[attr-defined]
    gc.collect()  # survives it, so it now lives in the oldest generation
    del cycle
    return int(a[0])


def hold_in_a_cycle(a: np.ndarray) -> int:
    """Leave the (in-place) argument referenced only by a reference cycle, as an nn.Module's
    parameters are: garbage, but alive until the cyclic collector runs."""
    import gc

    gc.disable()  # so only shmpool's own collection can free it
    try:
        _Cycle(a)
    finally:
        gc.enable()
    return int(a[0])

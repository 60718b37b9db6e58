"""What the benchmark measures besides wall time: memory peaks, the memcpy floor, the machine.

Memory is measured system-wide: ``MemTotal - MemAvailable`` sampled every few milliseconds in a
thread, so the workers, the sidecar and every shared-memory segment count, plus this process's RSS.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import threading
import time

# Sampling period: short enough to catch a transient copy of a 16 MiB payload, long enough
# that reading /proc/meminfo (~30 us) costs the timed process about 1% of one core.
SAMPLE_PERIOD_S = 0.005


def system_used() -> int:
    """Bytes in use machine-wide: MemTotal - MemAvailable from /proc/meminfo (0 if unreadable)."""
    total = avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key == "MemTotal":
                    total = int(rest.split()[0]) * 1024
                elif key == "MemAvailable":
                    avail = int(rest.split()[0]) * 1024
                if total is not None and avail is not None:
                    return total - avail
    except OSError:
        pass
    return 0


class PeakSampler:
    """Peak growth of system memory and of this process's RSS while a ``with`` block runs."""

    def __init__(self, period_s: float = SAMPLE_PERIOD_S):
        self.period_s = period_s
        import psutil  # the bench extra; cli checks for it before the run

        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sys_growth = 0
        self.rss_growth = 0

    def _sample(self) -> None:
        self._sys_peak = max(self._sys_peak, system_used())
        self._rss_peak = max(self._rss_peak, self._proc.memory_info().rss)

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self._sample()

    def __enter__(self) -> "PeakSampler":
        self._sys_base = self._sys_peak = system_used()
        self._rss_base = self._rss_peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._loop, name="shmpool-bench-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()  # the end state counts too (the result object is alive here)
        self.sys_growth = max(0, self._sys_peak - self._sys_base)
        self.rss_growth = max(0, self._rss_peak - self._rss_base)


def memcpy_floor(nbytes: int, reps: int) -> float:
    """Median seconds for one ``numpy.copyto`` of ``nbytes`` (pages touched beforehand)."""
    import numpy as np

    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault in dst's pages: the floor is the copy, not the page faults
    times = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # not installed, or installed without metadata (a source checkout)
        return None


def machine() -> dict:
    """A description of where the figures came from, for the JSON report."""
    import psutil

    return {
        "cpu_model": _cpu_model(),
        "cores_logical": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_total_bytes": psutil.virtual_memory().total,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "versions": {m: _version(m) for m in ("shmpool", "torch", "triton", "numpy", "psutil", "cloudpickle")},
    }

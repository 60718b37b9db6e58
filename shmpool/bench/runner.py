"""Run cases over pools: warm-up, interleaved repetitions, memory peaks, failures kept.

For each case every pool first runs it once untimed (warm-up: imports, ring growth, page
faults); then each repetition visits every pool once, the starting pool rotating per
repetition, so drift on a noisy machine (thermal, a neighbour's job) hits all pools alike.

A pool that fails (exception, wrong answer, deadline) gets ``status = "failed: <Type>"`` for
that case, is torn down and rebuilt, and skips the rest of that case; the run goes on.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

from shmpool.bench.measure import PeakSampler, memcpy_floor
from shmpool.bench.pools import PoolUnavailable, PoolUnderTest
from shmpool.bench.workloads import Case

# Memory sampling starts a thread per repetition; below this many bytes moved the peaks are
# noise (a page or two) and the thread's wake-ups would be a visible share of the time.
SAMPLE_MEMORY_FROM = 1 << 20
# Repetitions of the memcpy floor, which is cheap and steady.
FLOOR_REPS = 7


@dataclasses.dataclass
class Result:
    workload: str
    case: str
    pool: str
    size: int
    bytes_moved: int
    jobs: int
    status: str = "ok"  # "ok", "failed: <ExceptionType>", "skipped: <reason>"
    error: str | None = None
    times_s: list[float] = dataclasses.field(default_factory=list)
    median_s: float | None = None
    min_s: float | None = None
    max_s: float | None = None
    spread: float | None = None  # (max - min) / median over the repetitions
    gb_per_s: float | None = None  # bytes_moved / median, decimal GB
    jobs_per_s: float | None = None
    memcpy_floor_s: float | None = None  # one numpy.copyto of `size` bytes, same run
    sys_peak_growth_bytes: int | None = None  # max over repetitions
    rss_peak_growth_bytes: int | None = None
    copies_per_byte: float | None = None  # shmpool only: copied / bytes, both directions
    stats_delta: dict | None = None  # shmpool only: PoolStats over warm-up + repetitions
    extra: dict = dataclasses.field(default_factory=dict)  # per-workload figures (medians)

    def finish(self) -> None:
        if not self.times_s:
            return
        t = self.times_s
        self.median_s = statistics.median(t)
        self.min_s, self.max_s = min(t), max(t)
        self.spread = (self.max_s - self.min_s) / self.median_s if self.median_s else None
        if self.bytes_moved and self.median_s:
            self.gb_per_s = self.bytes_moved / self.median_s / 1e9
        if self.jobs > 1 and self.median_s:
            self.jobs_per_s = self.jobs / self.median_s


def _describe(exc: BaseException) -> tuple[str, str]:
    name = type(exc).__name__
    text = str(exc).strip().splitlines()
    return f"failed: {name}", f"{name}: {text[0] if text else ''}"[:300]


def _stats_delta(before: dict | None, after: dict | None) -> dict | None:
    if before is None or after is None:
        return None
    return {k: after[k] - before[k] for k in after if isinstance(after[k], int) and k in before}


def _copies_per_byte(delta: dict | None) -> float | None:
    if not delta:
        return None
    moved = delta.get("bytes_to_workers", 0) + delta.get("bytes_from_workers", 0)
    copied = delta.get("copied_to_workers", 0) + delta.get("copied_from_workers", 0)
    return copied / moved if moved else None


def ensure_started(pool: PoolUnderTest) -> str | None:
    """Start ``pool`` if needed; return None when it is usable, else the status to record."""
    if pool.pool is not None:
        return None
    if pool.unavailable:
        return f"skipped: {pool.unavailable}"
    try:
        pool.start()
        return None
    except PoolUnavailable as e:
        return f"skipped: {e}"
    except Exception as e:
        pool.unavailable = f"could not start ({_describe(e)[1]})"
        return f"failed: {type(e).__name__}"


def run_case(case: Case, pools: list[PoolUnderTest], repeat: int,
             tick: Callable[[str], None] = lambda _s: None) -> list[Result]:
    """Run one case on every pool; one Result per pool, in the order of ``pools``."""
    results = {p.name: Result(case.workload, case.name, p.name, case.size, case.bytes_moved, case.jobs) for p in pools}
    if case.skip:
        for r in results.values():
            r.status = f"skipped: {case.skip}"
        tick(case.name)
        return list(results.values())

    payload = case.setup()
    floor = memcpy_floor(case.size, FLOOR_REPS) if case.floor and case.size else None
    live: list[PoolUnderTest] = []
    before: dict[str, dict | None] = {}
    extras: dict[str, list[dict]] = {p.name: [] for p in pools}
    sys_peak: dict[str, int] = {}
    rss_peak: dict[str, int] = {}

    def fail(p: PoolUnderTest, exc: BaseException) -> None:
        r = results[p.name]
        r.status, r.error = _describe(exc)
        if p in live:
            live.remove(p)
        p.close()  # rebuilt lazily by the next case (ensure_started)
        p.restarts += 1

    # warm-up: start, import what the workload needs in every worker, one untimed run
    for p in pools:
        results[p.name].memcpy_floor_s = floor
        status = ensure_started(p)
        if status:
            results[p.name].status = status
            results[p.name].error = p.unavailable
            tick(f"{case.name} {p.name}")
            continue
        try:
            if case.warm_modules:
                p.warm(case.warm_modules, timeout=case.timeout)
            before[p.name] = p.stats()
            case.run(p, payload, case.timeout)
            live.append(p)
        except Exception as e:
            fail(p, e)
        tick(f"{case.name} {p.name} warm-up")

    sample = case.bytes_moved >= SAMPLE_MEMORY_FROM
    for rep in range(repeat):
        order = live[rep % len(live):] + live[:rep % len(live)] if live else []
        for p in order:
            if p not in live:  # failed earlier in this repetition
                continue
            try:
                if sample:
                    with PeakSampler() as s:
                        t0 = time.perf_counter()
                        extra = case.run(p, payload, case.timeout)
                        dt = time.perf_counter() - t0
                    sys_peak[p.name] = max(sys_peak.get(p.name, 0), s.sys_growth)
                    rss_peak[p.name] = max(rss_peak.get(p.name, 0), s.rss_growth)
                else:
                    t0 = time.perf_counter()
                    extra = case.run(p, payload, case.timeout)
                    dt = time.perf_counter() - t0
                results[p.name].times_s.append(dt)
                extras[p.name].append(extra)
            except Exception as e:
                fail(p, e)
            tick(f"{case.name} {p.name} rep {rep + 1}")

    for p in pools:
        r = results[p.name]
        r.finish()
        r.sys_peak_growth_bytes = sys_peak.get(p.name)
        r.rss_peak_growth_bytes = rss_peak.get(p.name)
        if p in live:
            r.stats_delta = _stats_delta(before.get(p.name), p.stats())
            r.copies_per_byte = _copies_per_byte(r.stats_delta)
        if extras[p.name]:
            keys = extras[p.name][0].keys()
            r.extra = {k: statistics.median(e[k] for e in extras[p.name]) for k in keys}
    del payload
    return list(results.values())


def steps_for(cases: list[Case], pools: list[PoolUnderTest], repeat: int) -> int:
    """Progress-bar length matching the ticks run_case makes."""
    return sum(1 if c.skip else len(pools) * (1 + repeat) for c in cases)

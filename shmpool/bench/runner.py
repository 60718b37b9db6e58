"""Run cases over pools: warm-up, interleaved repetitions, memory peaks, failures kept.

For each case every pool first runs it once untimed (warm-up: imports, ring growth, page
faults); then each repetition visits every pool once, the starting pool rotating per
repetition, so drift on a noisy machine (thermal, a neighbour's job) hits all pools alike.

Peak memory comes from one extra, untimed repetition per pool with the sampler thread on.

A pool that fails (exception, deadline) gets ``status = "failed: <Type>"`` for that case, is torn
down (rebuilt when the next case needs it) and skips the rest of that case; the run goes on. A
wrong answer (WrongResult) is recorded the same way but keeps the pool.
"""
from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from typing import Callable

from shmpool.bench.measure import PeakSampler, memcpy_floor
from shmpool.bench.pools import PoolUnavailable, PoolUnderTest
from shmpool.bench.workloads import Case, WrongResult

# Below this many bytes moved, peak memory growth is noise (a page or two): not sampled.
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
    spread: float | None = None  # interquartile range / median over the repetitions
    gb_per_s: float | None = None  # bytes_moved / median, decimal GB
    jobs_per_s: float | None = None
    memcpy_floor_s: float | None = None  # one numpy.copyto of `size` bytes, same run
    floor_s: float | None = None  # the case's own floor (Case.floor_fn), same run
    floor_label: str = ""
    sys_peak_growth_bytes: int | None = None  # from one extra untimed repetition, sampled
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
        if len(t) > 1 and self.median_s:
            q1, _, q3 = statistics.quantiles(t, n=4, method="inclusive")
            self.spread = (q3 - q1) / self.median_s
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
    case_floor = case.floor_fn(payload) if case.floor_fn is not None else None
    live: list[PoolUnderTest] = []
    before: dict[str, dict | None] = {}
    extras: dict[str, list[dict]] = {p.name: [] for p in pools}

    def fail(p: PoolUnderTest, exc: BaseException) -> None:
        r = results[p.name]
        r.status, r.error = _describe(exc)
        if p in live:
            live.remove(p)
        if not isinstance(exc, WrongResult):  # broken, wedged or unknown: rebuild before the next case
            p.close()
            p.restarts += 1

    # Each case pays for its own garbage only: no full collection (100-200 ms with torch loaded)
    # that an earlier case's objects set off.
    gc.collect()
    # warm-up: start, import what the workload needs in every worker, one untimed run
    for p in pools:
        results[p.name].memcpy_floor_s = floor
        results[p.name].floor_s, results[p.name].floor_label = case_floor, case.floor_label
        if case.only_pools is not None and p.name not in case.only_pools:
            results[p.name].status = f"skipped: {case.workload} compares {' and '.join(case.only_pools)} only"
            tick(f"{case.name} {p.name}")
            continue
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
            case.run(p, payload if case.warm_arg is None else case.warm_arg, case.timeout)
            live.append(p)
        except Exception as e:
            fail(p, e)
        tick(f"{case.name} {p.name} warm-up")

    for rep in range(repeat * case.rep_factor):
        order = live[rep % len(live):] + live[:rep % len(live)] if live else []
        for p in order:
            if p not in live:  # failed earlier in this repetition
                continue
            try:
                if case.collect_each_run:
                    gc.collect()  # see Case.collect_each_run
                t0 = time.perf_counter()
                extra = case.run(p, payload, case.timeout)
                dt = time.perf_counter() - t0
                # A workload that times itself (its figure is one part of what run() does, such
                # as a pool's start-up inside a fresh interpreter) hands its figure back.
                dt = extra.pop("timed_s", dt)
                results[p.name].times_s.append(dt)
                extras[p.name].append(extra)
            except Exception as e:
                fail(p, e)
            tick(f"{case.name} {p.name} rep {rep + 1}")

    # Peak memory from one more, untimed repetition: the sampler thread takes the GIL every
    # few ms, and timed repetitions should not pay for watching them.
    if case.bytes_moved >= SAMPLE_MEMORY_FROM:
        for p in list(live):
            try:
                with PeakSampler() as s:
                    case.run(p, payload, case.timeout)
                results[p.name].sys_peak_growth_bytes = s.sys_growth
                results[p.name].rss_peak_growth_bytes = s.rss_growth
            except Exception as e:
                fail(p, e)
            tick(f"{case.name} {p.name} memory")

    for p in pools:
        r = results[p.name]
        r.finish()
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
    def runs_on(c: Case) -> int:
        return sum(1 for p in pools if c.only_pools is None or p.name in c.only_pools)

    return sum(1 if c.skip else len(pools) + runs_on(c) * (repeat * c.rep_factor + (c.bytes_moved >= SAMPLE_MEMORY_FROM))
               for c in cases)

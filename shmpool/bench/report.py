"""Turn Results into a text table, a JSON file and a PNG plot."""
from __future__ import annotations

import dataclasses
import json
from typing import Iterable

from shmpool.bench.runner import Result
from shmpool.bench.workloads import fmt_size


MEMORY_TABLE_FROM = 16 << 20


def _ms(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 0.01:
        return f"{s * 1e3:.3f} ms"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / (1 << 20):.0f} MiB" if n >= (1 << 20) else f"{n / 1024:.0f} KiB"


def _grid(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def baseline_of(results: Iterable[Result], preferred: tuple[str, ...]) -> str | None:
    """The first of ``preferred`` that produced a figure anywhere in this run."""
    ok = {r.pool for r in results if r.median_s is not None}
    return next((p for p in preferred if p in ok), None)


def speedup(r: Result, base: Result | None) -> float | None:
    if base is None or r.median_s is None or base.median_s is None or not r.median_s:
        return None
    return base.median_s / r.median_s


def _short(status: str) -> str:
    """'failed: BrokenProcessPool' stays; a skip's long reason is listed under the table."""
    return "skipped" if status.startswith("skipped") else status


def _cell(r: Result, base: Result | None, metric: str) -> str:
    if r.status != "ok" or r.median_s is None:
        return _short(r.status)
    if metric == "jobs":
        head = f"{r.jobs_per_s:,.0f} jobs/s"
    elif metric == "gbps" and r.gb_per_s is not None:
        head = f"{_ms(r.median_s)} {r.gb_per_s:.2f} GB/s"
    else:
        head = _ms(r.median_s)
    spread = f" ±{r.spread * 50:.0f}%" if r.spread is not None and len(r.times_s) > 1 else ""
    x = speedup(r, base)
    return f"{head}{spread} {x:.2f}x" if x is not None else f"{head}{spread}"


def table(results: list[Result], pools: list[str], baseline: str | None) -> str:
    """One block per workload: cases down, pools across, ``median ±half-spread speed-up``."""
    out = []
    workloads = list(dict.fromkeys(r.workload for r in results))
    for w in workloads:
        rs = [r for r in results if r.workload == w]
        cases = list(dict.fromkeys(r.case for r in rs))
        by = {(r.case, r.pool): r for r in rs}
        metric = "jobs" if w in ("throughput",) else ("gbps" if w == "payload" else "time")
        floor_label = next((r.floor_label for r in rs if r.floor_s is not None), None)
        header = [w] + (["memcpy x2"] if w == "payload" else []) + ([floor_label] if floor_label else []) + pools
        rows = []
        for c in cases:
            base = by.get((c, baseline))
            row = [c]
            if w == "payload":
                f = next((by[(c, p)].memcpy_floor_s for p in pools if (c, p) in by), None)
                row.append(_ms(2 * f) if f is not None else "-")
            if floor_label:
                f = next((by[(c, p)].floor_s for p in pools if (c, p) in by), None)
                row.append(_ms(f) if f is not None else "-")
            row += [_cell(by[(c, p)], base, metric) if (c, p) in by else "-" for p in pools]
            rows.append(row)
            if w == "throughput":
                rows.append(["  p50 / p99 latency"] + [
                    f"{_ms(by[(c, p)].extra.get('latency_p50_s'))} / {_ms(by[(c, p)].extra.get('latency_p99_s'))}"
                    if (c, p) in by and by[(c, p)].extra else "-" for p in pools])
        out.append(_grid(header, rows))
    return "\n\n".join(out)


def memory_table(results: list[Result], pools: list[str]) -> str:
    """Peak system-wide memory growth (and caller RSS growth) as multiples of the payload."""
    rows = []
    for r0 in results:
        # Below 16 MiB a whole-machine figure is mostly other processes' noise (the JSON has it all).
        if r0.pool != pools[0] or not r0.size or r0.size < MEMORY_TABLE_FROM:
            continue
        row = [f"{r0.workload} {r0.case}"]
        for p in pools:
            r = next((x for x in results if x.workload == r0.workload and x.case == r0.case and x.pool == p), None)
            if r is None or r.sys_peak_growth_bytes is None:
                row.append(_short(r.status) if r is not None and r.status != "ok" else "-")
                continue
            cell = f"sys {r.sys_peak_growth_bytes / r.size:.1f}x rss {r.rss_peak_growth_bytes / r.size:.1f}x"
            if r.copies_per_byte is not None:
                cell += f" cp {r.copies_per_byte:.2f}"
            row.append(cell)
        rows.append(row)
    if not rows:
        return ""
    return ("peak memory growth per payload byte (sys: whole machine, rss: this process; "
            "cp: shmpool copies per payload byte)\n" + _grid(["case"] + pools, rows))


def to_json(path: str, *, results: list[Result], pools: dict, machine: dict, config: dict, meta: dict) -> None:
    doc = {
        "tool": "shmpool-bench",
        **meta,
        "machine": machine,
        "config": config,
        "pools": pools,
        "results": [dataclasses.asdict(r) for r in results],
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False)


def plot(path: str, results: list[Result], pools: list[str], title: str) -> bool:
    """GB/s against payload size, log-log, one line per pool plus the memcpy floor.

    Returns False (and writes nothing) when the run has no payload figures.
    """
    rs = [r for r in results if r.workload == "payload"]
    if not rs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    floors = sorted({(r.size, r.memcpy_floor_s) for r in rs if r.memcpy_floor_s})
    if floors:
        ax.plot([s for s, _ in floors], [s / f / 1e9 for s, f in floors], "k--", lw=1,
                label="memcpy floor (2 copies)")
    for p in pools:
        pts = sorted((r.size, r.gb_per_s) for r in rs if r.pool == p and r.gb_per_s)
        failed = [r for r in rs if r.pool == p and r.status.startswith("failed")]
        label = p + (f" (failed from {fmt_size(min(r.size for r in failed))})" if failed else "")
        if pts:
            ax.plot([s for s, _ in pts], [g for _, g in pts], "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    sizes = sorted({r.size for r in rs})
    ax.set_xticks(sizes)
    ax.set_xticklabels([fmt_size(s) for s in sizes], rotation=45)
    ax.set_xlabel("payload (bytes each way)")
    ax.set_ylabel("round-trip throughput, GB/s (2N / median time)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True

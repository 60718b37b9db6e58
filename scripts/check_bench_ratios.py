#!/usr/bin/env python3
"""Fail when shmpool's speed-up over a peer pool drops under its stored floor.

    pytest bench/ --benchmark-group-by=group --benchmark-json=bench.json
    python scripts/check_bench_ratios.py bench.json [--floors bench/floors.json]

Reads pytest-benchmark's ``--benchmark-json`` output (or ``shmpool-bench --json``), takes the
median of shmpool's test and of the peer's test *from the same run* in each group, and
compares ``peer_median / shmpool_median`` with ``min_speedup`` from the floors file. Both
sides come from one run on one machine, so the ratio travels between machines far better
than either time does.

Exit status: 0 all checked floors hold; 1 a floor is broken, shmpool's result is missing,
or nothing could be checked; 2 the input cannot be read. A floor whose peer is not in the
run (torch not installed) is reported as not checked, not as a failure.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

DEFAULT_FLOORS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "bench", "floors.json")


class InputError(Exception):
    """The benchmark or floors file is missing or not in a shape we know."""


def load_medians(path: str) -> dict[tuple[str, str | None, str], float]:
    """(group, case, pool) -> median seconds, from either JSON format."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read benchmark JSON {path}: {e}") from e
    out: dict[tuple[str, str | None, str], float] = {}
    if isinstance(doc, dict) and "benchmarks" in doc:  # pytest-benchmark
        for b in doc["benchmarks"]:
            info = b.get("extra_info") or {}
            pool = info.get("pool") or (b.get("params") or {}).get("pool_name")
            # A test that times part of what it runs (torch-warmup: a pool's start-up inside a fresh
            # interpreter) stores its own median; pytest-benchmark's is then the whole run's.
            median = info.get("median_s", (b.get("stats") or {}).get("median"))
            if pool is None or median is None or b.get("group") is None:
                continue
            out[(b["group"], info.get("case"), pool)] = float(median)
    elif isinstance(doc, dict) and doc.get("tool") == "shmpool-bench":  # shmpool-bench --json
        for r in doc.get("results", []):
            if r.get("median_s") is None:
                continue
            out[(f"{r['workload']}-{r['case']}", None, r["pool"])] = float(r["median_s"])
            # "ndarray-16MiB" in workload "numpy" is group "numpy-16MiB", case "ndarray" in the suite
            variant, _, size = r["case"].rpartition("-")
            if variant:
                out[(f"{r['workload']}-{size}", variant, r["pool"])] = float(r["median_s"])
    else:
        raise InputError(f"{path}: neither pytest-benchmark JSON (no 'benchmarks') nor shmpool-bench JSON")
    return out


def find(medians, group: str, case: str | None, pool: str) -> float | None:
    if case is not None:
        return medians.get((group, case, pool))
    hits = [m for (g, _c, p), m in medians.items() if g == group and p == pool]
    return hits[0] if len(hits) == 1 else None


def load_floors(path: str) -> list[dict]:
    try:
        with open(path) as f:
            doc = json.load(f)
        floors = doc["floors"]
        for fl in floors:
            for key in ("group", "pool", "peer", "min_speedup"):
                if key not in fl:
                    raise KeyError(f"a floor lacks {key!r}: {fl}")
        return floors
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"cannot read floors {path}: {e}") from e


def check(medians, floors: list[dict], allow_missing: bool = False) -> tuple[list[str], list[str]]:
    """Return (report lines, failure lines)."""
    lines, failures = [], []
    checked = 0
    for fl in floors:
        group, case, pool, peer, floor = fl["group"], fl.get("case"), fl["pool"], fl["peer"], float(fl["min_speedup"])
        label = f"{group}{'/' + case if case else ''}: {pool} vs {peer}"
        peer_m = find(medians, group, case, peer)
        mine = find(medians, group, case, pool)
        if peer_m is None:
            lines.append(f"skip  {label}: no {peer} result in this run, not checked")
            continue
        if mine is None:
            msg = (f"FAIL  {label}: no {pool} result in this run (it failed, was deselected, or the "
                   f"group was renamed); the floor of {floor:g}x cannot be checked")
            (lines if allow_missing else failures).append(msg)
            continue
        checked += 1
        ratio = peer_m / mine
        msg = (f"{label}: {ratio:.2f}x faster ({mine * 1e3:.3f} ms vs {peer_m * 1e3:.3f} ms), "
               f"floor {floor:g}x")
        if ratio < floor:
            failures.append(f"FAIL  {msg} -- speed-up under its floor: a regression in shmpool, or a peer "
                            f"that got faster; rerun to rule out noise, then fix or lower the floor in the floors file")
        else:
            lines.append(f"ok    {msg}")
    if checked == 0 and not failures:
        failures.append("FAIL  no floor could be checked: the run holds none of the floors' groups "
                        "with both shmpool and a peer (was the suite deselected, or every peer missing?)")
    return lines, failures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench_json", help="pytest-benchmark --benchmark-json output (or shmpool-bench --json)")
    ap.add_argument("--floors", default=DEFAULT_FLOORS, help="floors file (default: bench/floors.json)")
    ap.add_argument("--allow-missing", action="store_true",
                    help="report a missing shmpool result instead of failing on it")
    args = ap.parse_args(argv)
    try:
        medians = load_medians(args.bench_json)
        floors = load_floors(args.floors)
    except InputError as e:
        print(f"check_bench_ratios: {e}", file=sys.stderr)
        return 2
    lines, failures = check(medians, floors, args.allow_missing)
    for line in lines:
        print(line)
    for line in failures:
        print(line, file=sys.stderr)
    if failures:
        print(f"check_bench_ratios: {len(failures)} floor(s) broken", file=sys.stderr)
        return 1
    print(f"check_bench_ratios: all {sum(l.startswith('ok') for l in lines)} checked floors hold")
    return 0


if __name__ == "__main__":
    sys.exit(main())

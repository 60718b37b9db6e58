"""RayPool beside shmpool's local pool and torch's pool, in one run: a 128 MiB round trip, then
a frozen-weight subprocess FX compile.

    python scripts/ray_compare.py [--size 128M] [--reps 3] [--width 4096] [--fx-reps 2]

Round trip: ``echo(payload)`` of random ``bytes`` through each pool (2 workers each, warmed,
median of --reps). FX compile: ``scripts/fx_ipc_timing.py`` with the three pools torch can be
given (torch's own, ``shmpool.torch.install()``, ``install(backend="ray")``). Ray is a local
one started here (``ray.init(num_cpus=cores)``), so the figures are what Ray's path costs on
one machine, before any network.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

ROUND_TRIP_DEADLINE_S = 600.0


def echo(x: bytes) -> bytes:
    return x


def make_pool(name: str, workers: int):
    if name == "torch":
        from torch._inductor.compile_worker.subproc_pool import SubprocKind, SubprocPool

        return SubprocPool(workers, kind=SubprocKind.SPAWN)
    if name == "shmpool":
        from shmpool import SubprocKind, SubprocPool

        return SubprocPool(workers, kind=SubprocKind.FORK)
    from shmpool.ray import RayPool

    return RayPool(workers)


def round_trips(size: int, reps: int, workers: int) -> dict[str, float]:
    block = os.urandom(1 << 20)
    payload = block * (size // len(block))
    medians = {}
    for name in ("torch", "shmpool", "ray"):
        pool = make_pool(name, workers)
        try:
            for _ in range(workers):  # warm: workers up, rings / store pages touched once
                assert pool.submit(echo, payload).result(ROUND_TRIP_DEADLINE_S) == payload
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                back = pool.submit(echo, payload).result(ROUND_TRIP_DEADLINE_S)
                times.append(time.perf_counter() - t)
                assert len(back) == size and back[-64:] == payload[-64:]
                del back
            medians[name] = statistics.median(times)
        finally:
            pool.shutdown()
        print(f"round trip {size >> 20} MiB  {name:<8} median {medians[name] * 1e3:8.1f} ms  (of {reps})", flush=True)
    return medians


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="128M")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--fx-reps", type=int, default=2)
    args = ap.parse_args()
    from shmpool.bench.workloads import parse_size

    import shmpool.ray

    shmpool.ray.connect(log_to_driver=False)
    rt = round_trips(parse_size(args.size), args.reps, args.workers)
    print(f"round trip ratios: ray/shmpool = {rt['ray'] / rt['shmpool']:.1f}x, "
          f"ray/torch = {rt['ray'] / rt['torch']:.2f}x, torch/shmpool = {rt['torch'] / rt['shmpool']:.1f}x", flush=True)

    import fx_ipc_timing

    timings, startup = fx_ipc_timing.measure(["torch", "shmpool", "ray"], args.fx_reps, args.width)
    print(fx_ipc_timing.report(timings, startup))
    # The first compile on a fresh worker also pays its imports and first page faults: the
    # ratios below are over the warm ones (all but each pool's first).
    warm = {name: ts[1:] or ts for name, ts in timings.items()}
    wall = {name: fx_ipc_timing.median(ts, "wall_s") for name, ts in warm.items()}
    ipc = {name: fx_ipc_timing.median(ts, "ipc_s") for name, ts in warm.items()}
    print("warm FX compile medians: " + ", ".join(
        f"{name} wall {wall[name]:.2f} s ipc {ipc[name] * 1e3:.0f} ms" for name in warm))
    print(f"warm FX compile ratios: wall ray/shmpool = {wall['ray'] / wall['shmpool']:.2f}x, "
          f"ray/torch = {wall['ray'] / wall['torch']:.2f}x; "
          f"ipc ray/shmpool = {ipc['ray'] / ipc['shmpool']:.2f}x, ray/torch = {ipc['ray'] / ipc['torch']:.2f}x")


if __name__ == "__main__":
    # As fx_ipc_timing: run from the module imported by name, so workers can import `echo`.
    import ray_compare

    ray_compare.main()

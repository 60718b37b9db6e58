"""shmpool beside torch's SubprocPool on torch's two workloads, one run, as ratios.

    python scripts/torch_compare.py [--fx-reps 3] [--kernels 16]

1. End-to-end subprocess FX compile of a frozen model whose payload is > 100 MB
   (scripts/fx_ipc_timing.py): wall time and the IPC part, medians over reps.
2. Batch Triton compile of `--kernels` distinct kernels on 2 workers
   (shmpool.bench.triton_batch), each pool warmed first, fresh Triton cache per batch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fx_ipc_timing  # noqa: E402  (scripts/ is sys.path[0] when run as a script)

import shmpool  # noqa: E402
from shmpool.bench import triton_batch  # noqa: E402

BATCH_DEADLINE_S = 600.0


def time_triton_batch(pool: Any, n: int, reps: int) -> list[float]:
    with tempfile.TemporaryDirectory(prefix="tri-warm-") as warm:
        triton_batch.check_blobs(triton_batch.compile_batch(pool, 2, cache_dir=warm, timeout=BATCH_DEADLINE_S))
    times = []
    for _ in range(reps):
        with tempfile.TemporaryDirectory(prefix="tri-batch-") as cache:
            t = time.perf_counter()
            blobs = triton_batch.compile_batch(pool, n, cache_dir=cache, timeout=BATCH_DEADLINE_S)
            times.append(time.perf_counter() - t)
        triton_batch.check_blobs(blobs)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fx-reps", type=int, default=3)
    ap.add_argument("--kernels", type=int, default=16)
    ap.add_argument("--batch-reps", type=int, default=3)
    args = ap.parse_args()

    timings, startup = fx_ipc_timing.measure(["torch", "shmpool"], args.fx_reps, 4096)
    print("== subprocess FX compile, frozen 2x4096x4096 MLP")
    print(fx_ipc_timing.report(timings, startup))
    # The first compile in a fresh worker also pays the worker's own warm-up; the
    # warm medians are the steady state a long-running process sees.
    warm = {p: ts[1:] or ts for p, ts in timings.items()}
    med = fx_ipc_timing.median
    print(
        f"warm medians (rep 2..): wall torch/shmpool = {med(warm['torch'], 'wall_s') / med(warm['shmpool'], 'wall_s'):.2f}x, "
        f"IPC torch/shmpool = {med(warm['torch'], 'ipc_s') / med(warm['shmpool'], 'ipc_s'):.1f}x"
    )

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    from torch._inductor.compile_worker.subproc_pool import SubprocKind as TorchKind
    from torch._inductor.compile_worker.subproc_pool import SubprocPool as TorchPool

    print(f"== batch Triton compile, {args.kernels} kernels, 2 workers (fork, torch's default)")
    results = {}
    for name, make in (
        ("torch", lambda: TorchPool(2, kind=TorchKind.FORK)),
        ("shmpool", lambda: shmpool.SubprocPool(2, kind=shmpool.SubprocKind.FORK)),
    ):
        pool = make()
        try:
            results[name] = time_triton_batch(pool, args.kernels, args.batch_reps)
        finally:
            pool.shutdown()
        print(f"{name:<8} " + " ".join(f"{t:.2f}s" for t in results[name]))
    print(
        f"median: torch {statistics.median(results['torch']):.2f}s, shmpool {statistics.median(results['shmpool']):.2f}s, "
        f"torch/shmpool = {statistics.median(results['torch']) / statistics.median(results['shmpool']):.2f}x"
    )


if __name__ == "__main__":
    main()

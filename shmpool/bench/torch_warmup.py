"""How long inductor's async-compile pool takes to become ready: torch's pool beside shmpool's.

What is timed is what a first ``torch.compile`` waits for with
``config.worker_start_method = "subprocess"``: ``AsyncCompile.wait_pool_ready()``, which
builds the pool (the module global ``SubprocPool``, shmpool's once ``shmpool.torch.install()``
ran) and waits for its readiness no-op to come back from a worker. Each measurement runs in a
fresh interpreter that has imported torch and inductor before the clock starts, so a pool's
start-up is all that is timed, with nothing cached from an earlier pool (not its workers, not
shmpool's fork helper).

    python -m shmpool.bench.torch_warmup [--workers 8] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap

POOLS = ("torch", "shmpool")
DEFAULT_WORKERS = 8
# A fresh interpreter imports torch and inductor (~5 s on 2 busy cores), then the pool starts
# (torch's 8 workers: ~5 s there). Far past that is a hang, not a slow machine.
RUN_TIMEOUT_S = 300.0

_CHILD = textwrap.dedent(
    """
    import json, sys, time
    pool_name, workers, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    import torch
    from torch._inductor import config
    from torch._inductor.async_compile import AsyncCompile, shutdown_compile_workers
    if pool_name == "shmpool":
        import shmpool.torch
        shmpool.torch.install()
    config.worker_start_method = "subprocess"
    config.compile_threads = workers
    start = time.perf_counter()
    AsyncCompile.wait_pool_ready(timeout=timeout)
    ready = time.perf_counter() - start
    pool = AsyncCompile.process_pool()
    print(json.dumps({"pool": pool_name, "class": type(pool).__module__ + "." + type(pool).__qualname__,
                      "workers": workers, "ready_s": ready}))
    shutdown_compile_workers()
    """
)


def _child_env() -> dict[str, str]:
    import shmpool

    root = os.path.dirname(os.path.abspath(list(shmpool.__path__)[0]))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    # The parent's own warm-up would start a pool before the clock does.
    env["TORCH_WARM_POOL"] = "0"
    return env


def measure_once(pool: str, workers: int = DEFAULT_WORKERS, timeout: float = RUN_TIMEOUT_S) -> float:
    """Seconds ``AsyncCompile.wait_pool_ready()`` took for ``pool`` ("torch" or "shmpool"), in a
    fresh interpreter. Raises RuntimeError with the child's stderr if it failed."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, pool, str(workers), str(timeout)],
        capture_output=True, text=True, env=_child_env(), timeout=timeout + 60,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"torch-warmup child for {pool} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    got = json.loads(lines[-1])
    expected = "shmpool.torch.TorchSubprocPool" if pool == "shmpool" else "torch._inductor.compile_worker.subproc_pool.SubprocPool"
    if got["class"] != expected:
        raise RuntimeError(f"torch-warmup child for {pool} built a {got['class']}, not a {expected}")
    return float(got["ready_s"])


def measure_alternating(workers: int = DEFAULT_WORKERS, rounds: int = 3) -> dict[str, list[float]]:
    """``rounds`` measurements per pool, alternating which goes first, so drift hits both alike."""
    out: dict[str, list[float]] = {p: [] for p in POOLS}
    for r in range(rounds):
        order = POOLS if r % 2 == 0 else POOLS[::-1]
        for p in order:
            out[p].append(measure_once(p, workers))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shmpool.bench.torch_warmup", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    got = measure_alternating(args.workers, args.rounds)
    for p, times in got.items():
        print(f"{p:>8}: median {statistics.median(times):.2f} s  runs {', '.join(f'{t:.2f}' for t in times)}")
    ratio = statistics.median(got["torch"]) / statistics.median(got["shmpool"])
    print(f"AsyncCompile.wait_pool_ready(), {args.workers} workers: shmpool {ratio:.2f}x torch's speed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

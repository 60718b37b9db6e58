"""Time one subprocess FX compile of a frozen model, split into compile and IPC.

    python scripts/fx_ipc_timing.py [--pool shmpool|torch|ray|both|all] [--reps N] [--width 4096]

A real torch.compile with TORCHINDUCTOR_FX_COMPILE_MODE=subprocess semantics and
freezing on, so the graph sent to the worker carries every weight (two
width x width fp32 layers: 134 MB at the default 4096). The pool torch uses has
its `submit` wrapped (on the instance, nothing in torch is changed) so the job runs
inside `shmpool.bench.jobs.timed_call`, which stamps CLOCK_MONOTONIC in the worker:

  to_worker   = worker starts the job  - parent calls submit   (pickle, move, unpickle)
  in_worker   = worker ends the job    - worker starts the job (the compile itself)
  from_worker = parent's future resolves - worker ends the job (result back)

CLOCK_MONOTONIC is one clock for every process on a Linux machine, so the
differences across processes are meaningful. Both pools are started and warmed
before timing, so the figures exclude worker start-up (reported separately).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

# Workers of both pools must import shmpool.bench.jobs (for timed_call); both pass the
# parent's sys.path on, so putting the checkout on it here is enough.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import shmpool.bench.jobs  # noqa: E402
import shmpool.torch  # noqa: E402
from shmpool import _torch_compat  # noqa: E402

# A compile of the 134 MB model takes ~10 s here; far past this is a hang.
JOB_DEADLINE_S = 600.0


def _now() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


@dataclasses.dataclass
class FxTiming:
    pool: str
    payload_bytes: int
    wall_s: float  # first call of the compiled model: the whole compile, end to end
    to_worker_s: float
    in_worker_s: float
    from_worker_s: float

    @property
    def ipc_s(self) -> float:
        return self.to_worker_s + self.from_worker_s


class FrozenMLP(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(width, width)
        self.fc2 = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _wrap_submit(pool: Any, records: list[dict[str, float]]) -> None:
    """Make pool.submit run each job through timed_call and record its timestamps."""
    inner_submit = pool.submit

    def submit(fn: Any, *args: Any, **kwargs: Any) -> Future[Any]:
        rec: dict[str, float] = {"payload": float(sum(len(getattr(a, "value", b"")) for a in args))}
        rec["submit"] = _now()
        inner = inner_submit(shmpool.bench.jobs.timed_call, fn, *args, **kwargs)
        outer: Future[Any] = Future()

        def done(f: Future[Any]) -> None:
            rec["resolved"] = _now()
            try:
                result, rec["start"], rec["end"] = f.result()
            except BaseException as e:  # noqa: BLE001 - handed on to the caller's future
                outer.set_exception(e)
                return
            records.append(rec)
            outer.set_result(result)

        inner.add_done_callback(done)
        return outer

    pool.submit = submit


def _configure_inductor() -> None:
    import torch._inductor.config as cfg

    cfg.freezing = True
    cfg.cpp.weight_prepack = False  # prepacked mkldnn weights cannot be pickled to a worker
    cfg.compile_threads = 1  # no async kernel pool: on CPU it would only run a no-op


def start_pool(which: str) -> tuple[Any, float]:
    """Build the FX pool torch would use with `which` installed; return it and its start-up time."""
    _torch_compat.drop_pools()
    if which == "shmpool":
        shmpool.torch.install()
    elif which == "ray":  # a local Ray (ray.init(num_cpus=cores)): what the remote path costs
        shmpool.torch.install(backend="ray")
    else:
        shmpool.torch.uninstall()
    t = time.perf_counter()
    pool = shmpool.torch.fx_process_pool()
    pool.submit(os.getpid).result(timeout=JOB_DEADLINE_S)
    return pool, time.perf_counter() - t


def time_one_compile(pool: Any, label: str, width: int) -> FxTiming:
    """One end-to-end compile of a fresh FrozenMLP with empty caches through `pool`."""
    records: list[dict[str, float]] = []
    _wrap_submit(pool, records)
    try:
        with tempfile.TemporaryDirectory(prefix="fx-ipc-") as cache:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
            os.environ["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")
            torch._dynamo.reset()
            torch.manual_seed(0)
            model = FrozenMLP(width).eval()
            x = torch.randn(2, width)
            with torch.no_grad(), shmpool.torch.subprocess_fx_compile():
                t = time.perf_counter()
                out = torch.compile(model)(x)
                wall = time.perf_counter() - t
                torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)
    finally:
        del pool.submit  # back to the class's submit
    if len(records) != 1:
        raise RuntimeError(f"expected one subprocess compile, saw {len(records)}: {shmpool.torch.fx_compile_counts()}")
    r = records[0]
    return FxTiming(label, int(r["payload"]), wall, r["start"] - r["submit"], r["end"] - r["start"], r["resolved"] - r["end"])


def measure(pools: list[str], reps: int, width: int) -> tuple[dict[str, list[FxTiming]], dict[str, float]]:
    _configure_inductor()
    timings: dict[str, list[FxTiming]] = {p: [] for p in pools}
    startup: dict[str, float] = {}
    for which in pools:
        pool, startup[which] = start_pool(which)
        for _ in range(reps):
            timings[which].append(time_one_compile(pool, which, width))
    _torch_compat.drop_pools()
    shmpool.torch.uninstall()
    return timings, startup


def median(ts: list[FxTiming], field: str) -> float:
    return statistics.median(getattr(t, field) for t in ts)


def report(timings: dict[str, list[FxTiming]], startup: dict[str, float]) -> str:
    lines = [
        f"{'pool':<8} {'payload_MB':>10} {'startup_s':>9} {'wall_s':>7} {'to_worker_ms':>12} "
        f"{'in_worker_s':>11} {'from_worker_ms':>14} {'ipc_ms':>8}"
    ]
    for which, ts in timings.items():
        for t in ts:
            lines.append(
                f"{which:<8} {t.payload_bytes / 1e6:>10.1f} {startup[which]:>9.2f} {t.wall_s:>7.2f} "
                f"{t.to_worker_s * 1e3:>12.1f} {t.in_worker_s:>11.2f} {t.from_worker_s * 1e3:>14.1f} {t.ipc_s * 1e3:>8.1f}"
            )
    if {"torch", "shmpool"} <= timings.keys():
        tt, ts = timings["torch"], timings["shmpool"]
        lines.append(
            f"medians: wall torch/shmpool = {median(tt, 'wall_s') / median(ts, 'wall_s'):.2f}x; "
            f"IPC torch/shmpool = {median(tt, 'ipc_s') / median(ts, 'ipc_s'):.1f}x "
            f"({median(tt, 'ipc_s') * 1e3:.0f} ms vs {median(ts, 'ipc_s') * 1e3:.0f} ms)"
        )
    if "ray" in timings:
        tr = timings["ray"]
        for other in ("shmpool", "torch"):
            if other in timings:
                to = timings[other]
                lines.append(
                    f"medians: wall ray/{other} = {median(tr, 'wall_s') / median(to, 'wall_s'):.2f}x; "
                    f"IPC ray/{other} = {median(tr, 'ipc_s') / median(to, 'ipc_s'):.1f}x "
                    f"({median(tr, 'ipc_s') * 1e3:.0f} ms vs {median(to, 'ipc_s') * 1e3:.0f} ms)"
                )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", choices=("shmpool", "torch", "ray", "both", "all"), default="both")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--width", type=int, default=4096)
    args = ap.parse_args()
    pools = {"both": ["torch", "shmpool"], "all": ["torch", "shmpool", "ray"]}.get(args.pool, [args.pool])
    timings, startup = measure(pools, args.reps, args.width)
    print(report(timings, startup))


if __name__ == "__main__":
    # Run from the module imported by name, not from __main__: the pickled graph names
    # FrozenMLP by its module, and a worker's __main__ is not this script.
    import fx_ipc_timing

    fx_ipc_timing.main()

"""The workloads: what one timed repetition does, per case.

A :class:`Case` is one row of the report (workload + size). ``setup()`` builds its payload once;
``run(pool, payload, timeout)`` performs one repetition through one pool, checks the answer,
and returns extra figures (latencies, job counts) or raises. The runner does the timing,
memory sampling, interleaving and failure handling, so a workload is only what it sends.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import operator
import os
import shutil
import tempfile
import time
from typing import Any, Callable

from shmpool.bench import jobs

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# Payload sizes: 1 KiB .. 1 GiB in powers of 4 (full), a handful for --quick.
FULL_SIZES = [KiB << (2 * i) for i in range(11)]
# 64 MiB costs the quick run ~13 s on 2 cores (torch's pool takes ~1.5 s a round trip); --full has it.
QUICK_SIZES = [KiB, 16 * KiB, 256 * KiB, MiB, 4 * MiB, 16 * MiB]
# The single "big" size of the oneway / numpy / fx-weights workloads.
QUICK_BIG = 16 * MiB
FULL_BIG = 256 * MiB
THROUGHPUT_JOBS = 3000
# Sub-MiB round trips take about a millisecond and jitter by as much: run them 5x as often.
CHEAP_REP_FACTOR = 5
TRITON_KERNELS = 16
# Deadline of one job: generous base plus a pessimistic 20 MB/s for the bytes it moves, so
# only a wedged or thrashing pool ever reaches it.
BASE_TIMEOUT_S = 60.0
SLOW_BYTES_PER_S = 20e6

WORKLOADS = ("payload", "oneway", "numpy", "throughput", "triton", "fx", "torch-warmup", "frozen-fx")
# Left out of --quick, each would cost the quick run a third of its one-minute budget on 2 cores:
# triton imports triton in every worker and compiles 16 kernels (~2 s) per repetition per pool;
# fx imports torch in every worker of every pool (~3 s each) before the first timed job;
# torch-warmup starts a fresh interpreter and a pool of 8 per repetition (~10 s each); frozen-fx
# compiles for real (seconds to minutes a repetition).
QUICK_WORKLOADS = ("payload", "oneway", "numpy", "throughput")


def fmt_size(n: int) -> str:
    for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{name}"
    return f"{n}B"


def parse_size(text: str) -> int:
    """'64K', '16M', '1G', '16MiB' or plain bytes -> bytes."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": KiB, "M": MiB, "G": GiB}.get(t[-1:], 1)
    digits = t[:-1] if mult != 1 else t
    try:
        return int(float(digits) * mult)
    except ValueError:
        raise ValueError(f"bad size {text!r}: use bytes or a K/M/G suffix, e.g. 16M") from None


def job_timeout(nbytes: int) -> float:
    return BASE_TIMEOUT_S + nbytes / SLOW_BYTES_PER_S


@dataclasses.dataclass
class Case:
    workload: str
    name: str
    size: int  # payload bytes (the plot's x axis); 0 where it does not apply
    bytes_moved: int  # bytes through the pool per repetition, both ways (for GB/s)
    setup: Callable[[], Any]
    run: Callable[[Any, Any, float], dict]
    jobs: int = 1
    floor: bool = False  # measure the memcpy floor of `size` beside it
    warm_modules: tuple[str, ...] = ()  # import these in every worker before timing
    skip: str | None = None  # a reason this case cannot run here
    timeout_s: float | None = None  # deadline of one repetition; None: from bytes_moved and jobs
    rep_factor: int = 1  # cheap cases run this many times --repeat, for a steadier median
    warm_arg: Any = None  # what the untimed warm-up run gets instead of the payload (None: the payload)
    only_pools: tuple[str, ...] | None = None  # run on these pools only (None: every pool)
    floor_fn: Callable[[Any], float] | None = None  # seconds for the payload without a pool (a floor column)
    floor_label: str = ""  # that column's name in the table
    # A full collection before every timed run, not only before the case: for a case whose runs
    # leave thousands of objects each (runs interleave pools, and a collection one pool's
    # objects set off would land on whichever runs next). Not for the rest: a collection walks
    # every object, and leaves a short run's caches cold (a 1 KiB round trip then takes 2x).
    collect_each_run: bool = False

    @property
    def timeout(self) -> float:
        if self.timeout_s is not None:
            return self.timeout_s
        return job_timeout(self.bytes_moved) * max(1, self.jobs // 100)


class WrongResult(AssertionError):
    """The job came back but with the wrong answer: recorded as a failure, the pool is kept."""


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise WrongResult(f"wrong result: {what}")


# ---------------------------------------------------------------- payload / oneway
def payload_bytes(n: int) -> bytes:
    """n bytes that no compressor or zero-page trick can shortcut (a random MiB, tiled)."""
    block = os.urandom(min(n, MiB))
    reps, rest = divmod(n, len(block))
    return block * reps + block[:rest]


def run_echo(pool, payload, timeout):
    r = pool.submit(jobs.echo, payload).result(timeout=timeout)
    _check(len(r) == len(payload) and r[:64] == payload[:64] and r[-64:] == payload[-64:], "echo mismatch")
    return {}


def run_consume(pool, payload, timeout):
    _check(pool.submit(jobs.consume, payload).result(timeout=timeout) == len(payload), "consume length")
    return {}


def run_produce(pool, n, timeout):
    r = pool.submit(jobs.produce, n).result(timeout=timeout)
    _check(len(r) == n and r[:1] == b"\x01", "produce length")
    return {}


def payload_cases(sizes: list[int]) -> list[Case]:
    return [
        Case("payload", fmt_size(n), n, 2 * n, (lambda n=n: payload_bytes(n)), run_echo, floor=True,
             rep_factor=CHEAP_REP_FACTOR if n < MiB else 1)
        for n in sizes
    ]


def oneway_cases(big: int) -> list[Case]:
    return [
        Case("oneway", f"arg-{fmt_size(big)}", big, big, lambda: payload_bytes(big), run_consume),
        Case("oneway", f"result-{fmt_size(big)}", big, big, lambda: big, run_produce),
    ]


# ---------------------------------------------------------------- numpy
def make_array(n: int):
    import numpy as np

    return np.frombuffer(payload_bytes(n), dtype=np.float32).copy().reshape(-1, 256)


def run_echo_array(pool, arr, timeout):
    r = pool.submit(jobs.echo, arr).result(timeout=timeout)
    # compare bytes, not floats: random bits include NaNs, and NaN != NaN
    _check(r.shape == arr.shape and r.dtype == arr.dtype
           and r[:1].tobytes() == arr[:1].tobytes() and r[-1:].tobytes() == arr[-1:].tobytes(), "array echo mismatch")
    return {}


def numpy_cases(big: int) -> list[Case]:
    skip = None if importlib.util.find_spec("numpy") else "numpy not installed"
    return [
        Case("numpy", f"ndarray-{fmt_size(big)}", big, 2 * big, lambda: make_array(big), run_echo_array,
             warm_modules=("numpy",), skip=skip),
        Case("numpy", f"bytes-{fmt_size(big)}", big, 2 * big, lambda: payload_bytes(big), run_echo),
    ]


# ---------------------------------------------------------------- throughput
def run_throughput(pool, njobs, timeout):
    done_at = [0.0] * njobs
    submitted_at = [0.0] * njobs

    def stamp(i):
        def cb(_f):
            done_at[i] = time.perf_counter()
        return cb

    futs = []
    for i in range(njobs):
        submitted_at[i] = time.perf_counter()
        f = pool.submit(operator.add, i, 1)
        f.add_done_callback(stamp(i))
        futs.append(f)
    deadline = time.monotonic() + timeout
    for i, f in enumerate(futs):
        _check(f.result(timeout=max(0.0, deadline - time.monotonic())) == i + 1, f"add({i}, 1)")
    lat = sorted(d - s for d, s in zip(done_at, submitted_at))
    return {"latency_p50_s": lat[len(lat) // 2], "latency_p99_s": lat[min(len(lat) - 1, int(len(lat) * 0.99))]}


def throughput_cases(njobs: int = THROUGHPUT_JOBS) -> list[Case]:
    # warm-up with a tenth of the burst: enough to settle the pool, a second saved per pool
    return [Case("throughput", f"{njobs}-add", 0, 0, lambda: njobs, run_throughput, jobs=njobs,
                 warm_arg=max(1, njobs // 10), collect_each_run=True)]


# ---------------------------------------------------------------- triton
def _triton_batch():
    """shmpool.bench.triton_batch, or None with the reason it cannot run here."""
    if importlib.util.find_spec("triton") is None:
        return None, "triton not installed"
    try:
        from shmpool.bench import triton_batch
    except ImportError as e:
        return None, f"shmpool.bench.triton_batch not importable yet ({e})"
    if not hasattr(triton_batch, "compile_batch"):
        return None, "shmpool.bench.triton_batch has no compile_batch(pool, n)"
    return triton_batch, None


def run_triton(pool, n, timeout):
    tb, why = _triton_batch()
    if tb is None:
        raise RuntimeError(why)
    # A fresh Triton cache per repetition: the figure is n compiles, not n cache hits.
    cache_dir = tempfile.mkdtemp(prefix="shmpool-bench-triton-")
    try:
        blobs = tb.compile_batch(pool, n, cache_dir=cache_dir, timeout=timeout)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    _check(len(blobs) == n, f"{len(blobs)} kernels came back, not {n}")
    tb.check_blobs(blobs)
    return {"cubin_bytes": sum(len(b.cubin) for b in blobs)}


def triton_cases(n: int = TRITON_KERNELS) -> list[Case]:
    tb, why = _triton_batch()
    # 16 kernels took 1.9 s on 2 cores; 30 s per kernel means stuck, not slow.
    return [Case("triton", f"{n}-kernels", 0, 0, lambda: n, run_triton, jobs=n,
                 warm_modules=("triton", "triton.compiler"), skip=why, timeout_s=BASE_TIMEOUT_S + 30.0 * n)]


# ---------------------------------------------------------------- fx
def make_fx(layers: int, width: int, weights: bool):
    import torch
    import torch.fx

    class Deep(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = layers
            if weights:
                g = torch.Generator().manual_seed(0)
                for i in range(layers):  # frozen weights: buffers read by get_attr nodes
                    self.register_buffer(f"w{i}", torch.randn(width, width, generator=g))

        def forward(self, x):
            for i in range(self.layers):
                if weights:
                    x = torch.relu(x @ getattr(self, f"w{i}")) + x
                else:
                    x = torch.relu(x * 1.01 + i) - x
            return x

    return torch.fx.symbolic_trace(Deep())


def run_fx(pool, gm, timeout):
    nodes, nbytes = pool.submit(jobs.fx_summary, gm).result(timeout=timeout)
    _check(nodes == len(gm.graph.nodes), f"fx node count {nodes} != {len(gm.graph.nodes)}")
    return {"fx_nodes": nodes, "fx_weight_bytes": nbytes}


def fx_cases(big: int, graph_layers: int = 1000) -> list[Case]:
    skip = None if importlib.util.find_spec("torch") else "torch not installed"
    width = 512 if big >= 64 * MiB else 256
    layers = max(1, big // (width * width * 4))
    nbytes = layers * width * width * 4
    return [
        Case("fx", f"graph-{graph_layers}layers", 0, 0, lambda: make_fx(graph_layers, 0, False), run_fx,
             warm_modules=("torch", "torch.fx"), skip=skip),
        Case("fx", f"weights-{fmt_size(nbytes)}", nbytes, nbytes, lambda: make_fx(layers, width, True), run_fx,
             warm_modules=("torch", "torch.fx"), skip=skip),
    ]


# ---------------------------------------------------------------- torch-warmup
# The pool each column stands for: torch's own pool as inductor builds it (a FORK sidecar), and
# shmpool's as shmpool.torch.install() makes inductor build it (FORK, helper prepared as the sidecar).
TORCH_WARMUP_POOLS = {"shmpool-fork": "shmpool", "torch-spawn": "torch"}


def run_torch_warmup(pool, workers, timeout):
    """AsyncCompile.wait_pool_ready() with `workers` workers, in a fresh interpreter. The pool
    under test is not used: each repetition builds the pool inductor would, from nothing."""
    from shmpool.bench import torch_warmup

    return {"timed_s": torch_warmup.measure_once(TORCH_WARMUP_POOLS[pool.name], workers, timeout)}


def torch_warmup_cases(workers: int = 8) -> list[Case]:
    from shmpool.bench import torch_warmup

    skip = None if importlib.util.find_spec("torch") else "torch not installed"
    return [Case("torch-warmup", f"{workers}-workers", 0, 0, lambda: workers, run_torch_warmup,
                 skip=skip, timeout_s=torch_warmup.RUN_TIMEOUT_S, only_pools=tuple(TORCH_WARMUP_POOLS))]
# ---------------------------------------------------------------- frozen-fx
# (layers, width) of the frozen MLPs: 16 MiB (quick), 256 MiB in one layer and in four (full). On
# the 23 GiB, 2-core machine these were measured on, 1-4 GiB fit shmpool and in-process compile but
# not torch's pool (killed past 18 GiB at 2 GiB): scripts/frozen_fx.py measures those, one per process.
FROZEN_QUICK = [(4, 1024)]
FROZEN_FULL = [(1, 8192), (4, 4096)]
# A compile of 256 MiB took 10-45 s here, torch's pool the slowest; 30 s per 16 MiB is a hang.
FROZEN_BASE_TIMEOUT_S = 120.0


def _frozen_payload(layers: int, width: int):
    from shmpool.bench import frozen_fx

    return frozen_fx.make_model(layers, width)


_frozen_warmed: set[int] = set()  # pools (by id) whose every worker has compiled once


def run_frozen_fx(pool, payload, timeout):
    from shmpool.bench import frozen_fx

    if id(pool.pool) not in _frozen_warmed:  # a worker's first compile is slow on every pool
        frozen_fx.warm_workers(pool, pool.workers, timeout)
        _frozen_warmed.add(id(pool.pool))
    frozen_fx.compile_in_pool(pool, payload, out_of_band=pool.name.startswith("shmpool"))
    return {}


def _frozen_floor(payload) -> float:
    from shmpool.bench import frozen_fx

    return frozen_fx.in_process_seconds(payload)


def frozen_fx_cases(shapes: list[tuple[int, int]]) -> list[Case]:
    skip = None if importlib.util.find_spec("torch") else "torch not installed"
    out = []
    for layers, width in shapes:
        nbytes = layers * (width * width + width) * 4  # weights and biases: what crosses
        out.append(Case("frozen-fx", f"mlp-{layers}x{width}", nbytes, nbytes,
                        (lambda layers=layers, width=width: _frozen_payload(layers, width)), run_frozen_fx,
                        warm_modules=("torch", "torch._inductor.compile_fx_subproc"), skip=skip,
                        timeout_s=FROZEN_BASE_TIMEOUT_S + 30.0 * nbytes / (16 * MiB),
                        floor_fn=_frozen_floor, floor_label="in-process"))
    return out


def build(names: list[str], sizes: list[int], big: int) -> list[Case]:
    out: list[Case] = []
    for name in names:
        if name == "payload":
            out += payload_cases(sizes)
        elif name == "oneway":
            out += oneway_cases(big)
        elif name == "numpy":
            out += numpy_cases(big)
        elif name == "throughput":
            out += throughput_cases()
        elif name == "triton":
            out += triton_cases()
        elif name == "fx":
            out += fx_cases(big)
        elif name == "torch-warmup":
            out += torch_warmup_cases()
        elif name == "frozen-fx":
            out += frozen_fx_cases(FROZEN_FULL if big >= FULL_BIG else FROZEN_QUICK)
        else:
            raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    return out

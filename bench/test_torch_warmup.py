"""AsyncCompile.wait_pool_ready() with 8 workers: torch's pool beside shmpool's, same run.

Each figure is one fresh interpreter that has imported torch and inductor, building the pool
inductor builds with worker_start_method="subprocess" and waiting for its readiness job:
torch's own SubprocPool (a FORK sidecar), then shmpool's after shmpool.torch.install(). The
two alternate, round by round, so a busy neighbour slows both alike. The figures are taken
once per session and recorded under each pool's name; the pool's start-up is the figure (in
extra_info median_s, which check_bench_ratios.py reads), not the interpreter's.
"""
import statistics

import pytest

from shmpool.bench import torch_warmup, workloads as w

pytest.importorskip("torch")

WORKERS = 8
ROUNDS = 3
GROUP = f"torch-warmup-{WORKERS}-workers"


@pytest.fixture(scope="module")
def warmup_figures():
    return torch_warmup.measure_alternating(WORKERS, ROUNDS)


@pytest.mark.parametrize("warmup_pool", list(w.TORCH_WARMUP_POOLS))
def test_torch_warmup(benchmark, warmup_figures, warmup_pool):
    times = warmup_figures[w.TORCH_WARMUP_POOLS[warmup_pool]]
    benchmark.group = GROUP
    benchmark.extra_info.update(pool=warmup_pool, case="ready", median_s=statistics.median(times), runs_s=times)
    benchmark.pedantic(lambda: times, rounds=1, iterations=1)

"""torch.compile of a frozen-weight MLP with its FX graph compiled in each pool (CI-sized).

Each round is a real compile with empty caches and a new batch size; shmpool sends the weights out of band, the
others carry torch's pickled bytes. The in-process compile of the same model is the floor.
"""
import pytest

from shmpool.bench import workloads as w

pytest.importorskip("torch")

LAYERS, WIDTH = 2, 1024  # 8 MiB of weights: a few seconds a compile on 2 cores
ROUNDS = 2


@pytest.fixture(scope="module")
def frozen_mlp():
    from shmpool.bench import frozen_fx

    return frozen_fx.make_model(LAYERS, WIDTH)


def test_frozen_fx_compile(measure, pool, frozen_mlp, pool_name):
    pool.warm(("torch", "torch._inductor.compile_fx_subproc"), timeout=w.BASE_TIMEOUT_S * 3)
    size = LAYERS * (WIDTH * WIDTH + WIDTH) * 4
    measure(f"frozen-fx-mlp-{LAYERS}x{WIDTH}", "compile", w.run_frozen_fx, frozen_mlp, w.FROZEN_BASE_TIMEOUT_S,
            rounds=ROUNDS, bytes_moved=size)


def test_frozen_fx_in_process_floor(benchmark, frozen_mlp):
    """The floor, in the same group: no pool, the compile in this process."""
    from shmpool.bench import frozen_fx

    benchmark.group = f"frozen-fx-mlp-{LAYERS}x{WIDTH}"
    benchmark.extra_info.update(pool="in-process", case="compile")
    benchmark.pedantic(frozen_fx.compile_in_process, args=(frozen_mlp,), rounds=ROUNDS, warmup_rounds=1, iterations=1)

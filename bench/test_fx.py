"""A large pickled torch.fx GraphModule sent through each pool and unpickled in the worker."""
import pytest

from shmpool.bench import workloads as w

pytest.importorskip("torch")

GRAPH_LAYERS = 300  # ~1,500 nodes: unpickling re-traces the graph, so this is mostly worker CPU
WEIGHTS = 16 * w.MiB  # 64 frozen 256x256 fp32 buffers
ROUNDS = 3


@pytest.fixture(scope="module")
def graph_only():
    return w.make_fx(GRAPH_LAYERS, 0, False)


@pytest.fixture(scope="module")
def with_weights():
    width = 256
    return w.make_fx(WEIGHTS // (width * width * 4), width, True)


@pytest.mark.parametrize("case", ["graph", "weights"])
def test_fx_graph(measure, pool, graph_only, with_weights, case, pool_name):
    pool.warm(("torch", "torch.fx"), timeout=w.BASE_TIMEOUT_S * 3)
    gm = graph_only if case == "graph" else with_weights
    size = WEIGHTS if case == "weights" else 0
    group = f"fx-graph-{GRAPH_LAYERS}layers" if case == "graph" else f"fx-weights-{w.fmt_size(WEIGHTS)}"
    measure(group, case, w.run_fx, gm, w.job_timeout(size), rounds=ROUNDS, bytes_moved=size)

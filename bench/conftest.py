"""pytest-benchmark suite: shmpool beside torch's SubprocPool and the stdlib pools.

    pytest bench/ --benchmark-group-by=group                    # CI-quick: sizes <= 16 MiB, few rounds
    pytest bench/ --benchmark-group-by=group --bench-full       # + 64/256 MiB, more rounds, Triton
    pytest bench/ --benchmark-group-by=group --benchmark-json=out.json && \
        python scripts/check_bench_ratios.py out.json           # fail if a speed-up drops under its floor

Pools are started once per session (torch's pool alone takes ~10 s to start on 2 cores) and
shared by every test; each test is one (workload, size, pool) and its group is (workload, size),
so ``--benchmark-group-by=group`` prints shmpool and its peers side by side.

A peer that fails (``BrokenProcessPool``, a deadline) is marked xfail with the exception's
name and rebuilt for the next test; a failure of shmpool itself fails the test.
"""
from __future__ import annotations

import gc
import os
import sys

import pytest

# Run from a source checkout without `pip install -e .`: the package sits beside bench/.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from shmpool.bench import pools as pools_mod
from shmpool.bench.workloads import WrongResult

WORKERS = 2


def pytest_addoption(parser):
    g = parser.getgroup("shmpool-bench")
    g.addoption("--bench-full", action="store_true",
                help="larger sizes (64, 256 MiB), more rounds, and the Triton batch")
    g.addoption("--bench-pools", default=",".join(pools_mod.ALL_POOLS),
                help="comma separated pools to run (default: all)")


def pytest_configure(config):
    config.addinivalue_line("markers", "full: only with --bench-full (bigger sizes, Triton)")
    pools_mod.ensure_importable_by_workers()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def pytest_generate_tests(metafunc):
    if "pool_name" in metafunc.fixturenames:
        names = [n.strip() for n in metafunc.config.getoption("--bench-pools").split(",") if n.strip()]
        metafunc.parametrize("pool_name", names)


class Registry:
    """Pools shared by the session, started on first use and rebuilt after a failure."""

    def __init__(self):
        self.pools: dict[str, pools_mod.PoolUnderTest] = {}

    def get(self, name: str) -> pools_mod.PoolUnderTest:
        p = self.pools.setdefault(name, pools_mod.PoolUnderTest(name, WORKERS))
        if p.unavailable:
            pytest.skip(f"{name}: {p.unavailable}")
        if p.pool is None:
            try:
                p.start()
            except pools_mod.PoolUnavailable as e:
                pytest.skip(f"{name}: {e}")
        return p

    def close(self):
        for p in self.pools.values():
            p.close()


@pytest.fixture(scope="session")
def registry():
    reg = Registry()
    yield reg
    reg.close()


@pytest.fixture
def full(request) -> bool:
    return request.config.getoption("--bench-full")


@pytest.fixture
def pool(registry, pool_name):
    return registry.get(pool_name)


@pytest.fixture
def measure(benchmark, pool, registry):
    """``measure(group, case, fn, *args, rounds=, bytes_moved=)``: benchmark.pedantic with the
    suite's conventions (group, extra_info for the ratio checker, peers' failures as xfail)."""

    def run(group: str, case: str, fn, *args, rounds: int, bytes_moved: int = 0, warm_args=None):
        benchmark.group = group
        benchmark.extra_info.update(pool=pool.name, case=case, bytes_moved=bytes_moved)
        try:
            # A test pays for its own garbage only, not for a full collection (100-200 ms with
            # torch loaded) that an earlier test's objects would set off in its rounds. Once per
            # test, not per round: a collection walks every object, which leaves the caches cold
            # for a round as short as a 1 MiB round trip.
            gc.collect()
            if warm_args is not None:  # a cheaper untimed warm-up than one full round
                fn(pool, *warm_args)
            result = benchmark.pedantic(fn, args=(pool, *args), rounds=rounds, warmup_rounds=0 if warm_args else 1,
                                        iterations=1)
        except Exception as e:
            if pool.name.startswith("shmpool") or isinstance(e, WrongResult):
                raise
            # A peer that cannot do this is a finding, not a suite failure: say so and rebuild it.
            pool.close()
            pool.restarts += 1
            pytest.xfail(f"{pool.name} failed: {type(e).__name__}: {str(e)[:200]}")
        if bytes_moved and benchmark.stats:
            benchmark.extra_info["gb_per_s"] = bytes_moved / benchmark.stats.stats.median / 1e9
        return result

    return run


def pytest_collection_modifyitems(config, items):
    if config.getoption("--bench-full"):
        return
    skip = pytest.mark.skip(reason="full run only (pass --bench-full)")
    for item in items:
        if "full" in item.keywords:
            item.add_marker(skip)

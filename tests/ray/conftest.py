"""Fixtures for RayPool: one real Ray for the whole session, no mocks.

The session's Ray is a two-node cluster on this machine (``ray.cluster_utils.Cluster``): a
head node, where the contract tests' actors run, and a second node offering the
``shmpool_remote`` resource, which the remote-compile test pins its workers to. Each node has
its own raylet and its own object store, so a job sent there crosses nodes as it would between
machines (only the disk is shared, which the torch test rules out with per-worker cache dirs).

Each test module skips itself (``pytest.importorskip``) when the ``ray`` extra is not
installed; this file imports Ray only inside its fixtures, so it loads without it.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from rayutil import OBJECT_STORE_BYTES, REMOTE_RESOURCE, TEST_ACTOR_OPTIONS, wait_store_empty


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    import ray
    from ray import cluster_utils

    # Workers must import the shmpool under test (this checkout), whatever is pip-installed.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([root, *([old] if old else [])])
    cluster = cluster_utils.Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "object_store_memory": OBJECT_STORE_BYTES, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=2, resources={REMOTE_RESOURCE: 8}, object_store_memory=OBJECT_STORE_BYTES)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


@pytest.fixture
def kind() -> str:
    return "ray"


@pytest.fixture
def make_pool(ray_cluster: Any) -> Iterator[Callable[..., Any]]:
    from shmpool.ray import RayPool

    pools: list[RayPool] = []

    def make(nprocs: int = 1, **kwargs: Any) -> RayPool:
        kwargs.pop("kind", None)
        kwargs.setdefault("actor_options", TEST_ACTOR_OPTIONS)
        pool = RayPool(nprocs, **kwargs)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.shutdown()
    assert wait_store_empty() == (0, 0), "objects left in Ray's object store after shutdown()"


@pytest.fixture
def pool(make_pool: Callable[..., Any]) -> Any:
    return make_pool(2)

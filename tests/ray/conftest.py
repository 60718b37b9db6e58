"""Fixtures for RayPool: one real Ray for the whole session, no mocks.

The session's Ray is a two-node cluster on this machine (``ray.cluster_utils.Cluster``): a
head node, where the contract tests' actors run, and a second node offering the
``shmpool_remote`` resource, which the remote-compile test pins its workers to. Each node has
its own raylet and its own object store, so a job sent there crosses nodes as it would between
machines (only the disk is shared, which the torch test rules out with per-worker cache dirs).

Skipped as a whole, cleanly, when the ``ray`` extra is not installed.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install shmpool[ray])")
cluster_utils = pytest.importorskip("ray.cluster_utils")

from shmpool.ray import RayPool  # noqa: E402

# Per node: enough for the 64 MiB round trips (payload and result both in the store) with room.
OBJECT_STORE_BYTES = 400 << 20
REMOTE_RESOURCE = "shmpool_remote"
# A quarter CPU per actor: a 2-core machine runs a pool of two plus the replacements the crash
# tests start while Ray still releases the dead ones' share.
TEST_ACTOR_OPTIONS = {"num_cpus": 0.25}
STORE_EMPTY_DEADLINE_S = 30.0  # Ray frees objects asynchronously once the last reference goes


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
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


def store_objects() -> tuple[int, int]:
    """(objects, MiB) in every node's object store.

    Ray has no public call for this without the dashboard; ``memory_summary`` (the engine of
    ``ray memory``) is the one way. Private: isolated here, checked against Ray 2.60.0.
    """
    import re

    from ray._private.internal_api import memory_summary

    text = memory_summary(stats_only=True)
    m = re.search(r"Plasma memory usage (\d+) MiB, (\d+) objects", text)
    assert m, f"unexpected memory summary: {text!r}"
    return int(m.group(2)), int(m.group(1))


def wait_store_empty() -> tuple[int, int]:
    deadline = time.monotonic() + STORE_EMPTY_DEADLINE_S
    while (left := store_objects())[0] and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.fixture
def kind() -> str:
    return "ray"


@pytest.fixture
def make_pool(ray_cluster: Any) -> Iterator[Callable[..., RayPool]]:
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
def pool(make_pool: Callable[..., RayPool]) -> RayPool:
    return make_pool(2)

"""Shared fixtures: pools of both kinds that are always shut down, and a check that nothing of
ours is left in /dev/shm after each test."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from shmpool import SubprocKind, SubprocPool

def ours_in_dev_shm(pid: int | None = None) -> list[str]:
    """Our names in /dev/shm: semaphores of this process (or of ``pid``)."""
    prefix = f"sem.shmp.{pid or os.getpid()}."
    return sorted(e for e in os.listdir("/dev/shm") if e.startswith(prefix))


@pytest.fixture(params=[SubprocKind.SPAWN, SubprocKind.FORK], ids=["spawn", "fork"])
def kind(request: pytest.FixtureRequest) -> SubprocKind:
    return request.param


@pytest.fixture
def make_pool(kind: SubprocKind) -> Iterator[Callable[..., SubprocPool]]:
    pools: list[SubprocPool] = []

    def make(nprocs: int = 1, **kwargs: object) -> SubprocPool:
        pool = SubprocPool(nprocs, kind=kwargs.pop("kind", kind), **kwargs)  # type: ignore[arg-type]
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.shutdown()
    assert ours_in_dev_shm() == []


@pytest.fixture
def pool(make_pool: Callable[..., SubprocPool]) -> SubprocPool:
    return make_pool(2)

"""A FORK pool torch builds forks its workers from a helper prepared as torch's sidecar is.

torch's sidecar imports inductor and runs `pre_fork_setup()` once, then forks its workers,
so they start warm; shmpool's fork helper does the same on start-up (preload) and lives
through quiesce(), so a wakeup() forks warm workers again instead of importing inductor in
each. The time it saves is measured side by side in bench/test_torch_warmup.py.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import shmpool  # noqa: E402
from shmpool.torch import TorchSubprocPool  # noqa: E402

pytestmark = pytest.mark.torch

# The helper imports torch and inductor in ~5 s on 2 cores; far past it is a hang.
JOB_DEADLINE_S = 300.0
# Quiesced workers get QUIT and exit within the pool's own grace periods (a few s).
QUIESCE_DEADLINE_S = 30.0
# What torch's compile_worker/__main__.py has imported before it forks a worker.
SIDECAR_MODULES = (
    "torch._inductor.async_compile",
    "torch._inductor.codecache",
    "torch._inductor.compile_worker.utils",
    "torch._inductor.runtime.compile_tasks",
)


def _modules_at_fork() -> dict[str, bool]:
    """In a worker: which of the sidecar's modules it has. `shmpool._torch_preload` is imported
    only by a prepared fork helper, so a worker that has it came from one."""
    return {name: name in sys.modules for name in (*SIDECAR_MODULES, "shmpool._torch_preload")}


def _helper_maps(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


def _wait_no_workers(pool: shmpool.SubprocPool) -> None:
    deadline = time.monotonic() + QUIESCE_DEADLINE_S
    while pool.worker_pids():
        assert time.monotonic() < deadline, f"workers {pool.worker_pids()} still up after quiesce()"
        time.sleep(0.05)


def test_fork_helper_is_prepared_like_torchs_sidecar_and_outlives_quiesce(fresh_inductor: Path) -> None:
    pool = TorchSubprocPool(2)
    try:
        seen = pool.submit(_modules_at_fork).result(timeout=JOB_DEADLINE_S)
        assert all(seen.values()), seen
        [helper] = pool.helper_pids()
        assert "libtorch_cpu" in _helper_maps(helper)
        first_workers = set(pool.worker_pids())

        pool.quiesce()
        _wait_no_workers(pool)
        assert pool.helper_pids() == [helper]  # still warm, still ours
        pool.wakeup()
        pid = pool.submit(os.getpid).result(timeout=JOB_DEADLINE_S)
        assert pid not in first_workers  # a fresh worker ...
        assert pool.helper_pids() == [helper]  # ... forked by the same helper
    finally:
        pool.shutdown()


def test_spawn_pool_workers_set_themselves_up(fresh_inductor: Path) -> None:
    # No helper in a SPAWN pool (torch's FX pool): each worker imports inductor itself.
    pool = TorchSubprocPool(1, kind=shmpool.SubprocKind.SPAWN)
    try:
        seen = pool.submit(_modules_at_fork).result(timeout=JOB_DEADLINE_S)
        assert pool.helper_pids() == []
    finally:
        pool.shutdown()
    assert seen["shmpool._torch_preload"] is False
    assert seen["torch._inductor.async_compile"] is True  # imported by the initializer

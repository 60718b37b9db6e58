"""Inductor's async kernel-compile pool (worker_start_method="subprocess") as a shmpool pool.

On a CPU-only machine inductor compiles C++ kernels on threads and sends only its
readiness no-op and Triton/CuteDSL kernels to this pool, so besides compiling a model
with the pool in place, the Triton batch is run through the very pool torch built:
it proves those workers, set up as torch's, compile real GPU kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import time

import pytest

torch = pytest.importorskip("torch")

import shmpool.torch  # noqa: E402
from shmpool import _torch_compat  # noqa: E402
from shmpool.bench import triton_batch  # noqa: E402

pytestmark = pytest.mark.torch

# Two spawned workers import torch and inductor in ~10 s on 2 cores; far past that is a hang.
POOL_READY_DEADLINE_S = 300.0
# Quiesced workers get QUIT and exit within the pool's own grace periods (a few s).
QUIESCE_DEADLINE_S = 30.0


@pytest.fixture
def async_pool_settings(
    shm_installed: Any, fresh_inductor: Path, inductor_patch: Callable[..., None]
) -> Any:
    inductor_patch(worker_start_method="subprocess", compile_threads=2)
    yield shm_installed
    # The pool was built for these settings; the next test builds its own.
    _torch_compat.drop_pools()
    shm_installed.install()


def test_model_compiles_with_shmpool_kernel_pool(async_pool_settings: Any) -> None:
    def f(x: Any, w: Any) -> Any:
        return torch.nn.functional.gelu(x @ w).softmax(dim=-1) + x.mean()

    x, w = torch.randn(8, 16), torch.randn(16, 16)
    actual = torch.compile(f)(x, w)
    torch.testing.assert_close(actual, f(x, w))

    pool = async_pool_settings.async_compile_pool()
    assert type(pool) is shmpool.torch.TorchSubprocPool
    # torch.compile warmed this pool and woke it; its readiness job ran in a worker.
    _torch_compat.async_compile_wait_ready(POOL_READY_DEADLINE_S)
    assert pool.stats().jobs_completed >= 1
    # Readiness needs one worker; the other may still be starting (seen on torch 2.14.1).
    deadline = time.monotonic() + POOL_READY_DEADLINE_S
    while len(pool.worker_pids()) < 2:
        assert time.monotonic() < deadline, f"only workers {pool.worker_pids()} up"
        time.sleep(0.05)
    assert len(pool.worker_pids()) == 2


def test_wakeup_reaches_shmpool_pool(async_pool_settings: Any) -> None:
    pool = async_pool_settings.async_compile_pool()
    _torch_compat.async_compile_wait_ready(POOL_READY_DEADLINE_S)
    pool.quiesce()
    # quiesce() only asks; the dispatcher stops the workers a moment later.
    deadline = time.monotonic() + QUIESCE_DEADLINE_S
    while pool.worker_pids():
        assert time.monotonic() < deadline, f"workers {pool.worker_pids()} still up after quiesce()"
        time.sleep(0.05)
    started = pool.stats().workers_started
    # Only reaches pool.wakeup() if isinstance(pool, <torch's SubprocPool global>) holds.
    _torch_compat.async_compile_wakeup()
    pool.submit(int, "7").result(timeout=POOL_READY_DEADLINE_S)
    assert pool.stats().workers_started > started


def test_triton_kernels_compile_in_torch_configured_workers(
    async_pool_settings: Any, tmp_path: Path
) -> None:
    pytest.importorskip("triton")
    pool = async_pool_settings.async_compile_pool()
    blobs = triton_batch.compile_batch(pool, 4, cache_dir=str(tmp_path / "triton"), timeout=POOL_READY_DEADLINE_S)
    triton_batch.check_blobs(blobs)
    assert [b.index for b in blobs] == [0, 1, 2, 3]

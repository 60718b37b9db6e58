"""torch.compile with its FX compile on a Ray worker of another node: real torch, real Ray.

The worker gets cache directories of its own (empty, under a base only it is told about) and
the caller another, so the compiled model can only run here if everything the worker's compile
wrote came back with its result.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rayutil import REMOTE_RESOURCE, SKIP_REASON

ray = pytest.importorskip("ray", reason=SKIP_REASON)
torch = pytest.importorskip("torch", reason="the torch extra is not installed")

COMPILE_DEADLINE_S = 300.0


def node_id() -> str:
    return ray.get_runtime_context().get_node_id()


@pytest.fixture
def ray_installed(ray_cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    import torch._inductor.config as inductor_config

    import shmpool._torch_remote as remote
    import shmpool.torch

    caller_cache = tmp_path / "caller-cache"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(caller_cache))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(caller_cache / "triton"))
    monkeypatch.setattr(inductor_config, "compile_threads", 1)
    worker_base = tmp_path / "worker-caches"  # only the workers are told of it
    torch._dynamo.reset()
    shmpool.torch.clear_fx_compile_counts()
    shmpool.torch.install(backend="ray", address=ray_cluster.address, actor_options={
        "num_cpus": 0.25,
        "resources": {REMOTE_RESOURCE: 1},  # only the second node has it
        "runtime_env": {"env_vars": {remote.CACHE_BASE_VAR: str(worker_base)}},
    })
    try:
        yield caller_cache, worker_base
    finally:
        shmpool.torch.uninstall()
        torch._dynamo.reset()


def test_fx_compile_on_a_remote_node_runs_here(ray_installed: Any, ray_cluster: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._inductor.cpp_builder as cpp_builder

    import shmpool._torch_remote as remote
    import shmpool.torch

    caller_cache, worker_base = ray_installed
    builds: list[str] = []  # C++ builds in this process: there must be none
    real_build = cpp_builder.CppBuilder.build
    monkeypatch.setattr(cpp_builder.CppBuilder, "build", lambda self: (builds.append(self.get_target_file_path()), real_build(self))[1])

    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8)).eval()
    x = torch.randn(16, 64, generator=g)
    before = remote.shipped_counts()
    with torch.no_grad(), shmpool.torch.subprocess_fx_compile():
        compiled = torch.compile(model)
        got = compiled(x)
        want = model(x)
    torch.testing.assert_close(got, want)

    counts = shmpool.torch.fx_compile_counts()
    assert counts.get("_SubprocessFxCompile", 0) >= 1 and counts.get("_InProcessFxCompile", 0) == 0, counts
    # torch preprocesses (and may precompile) its C++ prefix header in the loading process
    # whenever it loads a kernel, cache hit or not, under default_cache_dir()/precompiled_headers;
    # a kernel built here would land in the caller's cache, and there must be none.
    kernel_builds = [b for b in builds if b.startswith(str(caller_cache))]
    assert kernel_builds == [], f"the caller compiled kernels itself: {kernel_builds}"

    pool = shmpool.torch.fx_process_pool()
    assert type(pool) is remote.TorchRayPool
    head = ray_cluster.head_node.node_id
    assert pool.submit(node_id).result(COMPILE_DEADLINE_S) != head  # the worker is on the other node

    shipped = remote.shipped_counts()
    assert shipped["jobs"] > before["jobs"] and shipped["files"] > before["files"]
    caller_libs = list(caller_cache.rglob("*.so"))
    assert caller_libs, "no compiled kernel library reached the caller's cache"
    # The worker's own caches: per-actor, apart from the caller's, and left with no job output.
    worker_dirs = list(worker_base.glob("worker-*"))
    assert worker_dirs and all(not str(d).startswith(str(caller_cache)) for d in worker_dirs)
    assert not [p for p in worker_base.rglob("*.so")], "job directories were not cleaned up on the worker"


def test_a_kernel_compile_on_the_remote_node_fills_the_callers_triton_cache(ray_installed: Any) -> None:
    pytest.importorskip("triton", reason="triton is not installed")
    import rayjobs

    import shmpool._torch_remote as remote

    caller_cache, worker_base = ray_installed
    caller_triton = caller_cache / "triton"
    pool = remote.TorchRayPool(1)  # as inductor builds it, on the second node (install's options)
    try:
        name = pool.submit(rayjobs.triton_kernel_into_cache, 3, {"TRITON_CACHE_DIR": str(caller_triton)}).result(COMPILE_DEADLINE_S)
    finally:
        pool.shutdown()
    cubins = list(caller_triton.rglob("*.cubin"))
    assert name and cubins and all(p.read_bytes().startswith(b"\x7fELF") for p in cubins)
    assert not list(worker_base.rglob("*.cubin")), "the worker kept the job's cache"


def test_the_async_compile_pool_is_a_ray_pool_and_answers(ray_installed: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._inductor.config as inductor_config

    import shmpool._torch_remote as remote
    import shmpool.torch
    from shmpool import _torch_compat

    monkeypatch.setattr(inductor_config, "compile_threads", 2)
    _torch_compat.drop_pools()
    try:
        assert type(shmpool.torch.async_compile_pool()) is remote.TorchRayPool
        _torch_compat.async_compile_wakeup()
        _torch_compat.async_compile_wait_ready(COMPILE_DEADLINE_S)  # torch's own readiness job
    finally:
        _torch_compat.drop_pools()

"""Job functions only the Ray tests use (the shared ones are in tests/corejobs.py)."""
from __future__ import annotations

import os
import signal


def kill_self(signum: int) -> None:
    os.kill(os.getpid(), signum)


def node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def length(data: bytes) -> int:
    return len(data)


def triton_kernel_into_cache(index: int, extra_env: dict[str, str]) -> str:
    """A kernel compile shaped like torch's ``_worker_compile_triton``: apply the caller's
    ``extra_env`` (its TRITON_CACHE_DIR), compile a real Triton kernel into that cache, answer
    its name. Needs no GPU (shmpool.bench.triton_batch targets sm_90 with Triton's own ptxas)."""
    os.environ.update(extra_env)
    from shmpool.bench import triton_batch

    return triton_batch.compile_kernel(index).name

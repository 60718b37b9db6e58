"""The Triton batch compile job through shmpool: real cubins for sm_90, no GPU needed."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("triton")

import shmpool  # noqa: E402
from shmpool.bench import triton_batch  # noqa: E402

pytestmark = pytest.mark.torch

# 8 kernels on 2 workers take ~3 s here, plus ~2 s to start the workers.
BATCH_DEADLINE_S = 300.0


@pytest.mark.parametrize("kind", [shmpool.SubprocKind.FORK, shmpool.SubprocKind.SPAWN])
def test_batch_returns_valid_distinct_cubins(kind: shmpool.SubprocKind, tmp_path: Path) -> None:
    pool = shmpool.SubprocPool(2, kind=kind)
    try:
        blobs = triton_batch.compile_batch(pool, 8, cache_dir=str(tmp_path), timeout=BATCH_DEADLINE_S)
    finally:
        pool.shutdown()
    triton_batch.check_blobs(blobs)
    assert [b.index for b in blobs] == list(range(8))
    assert all(b.cubin.startswith(b"\x7fELF") and len(b.cubin) > 1000 for b in blobs)
    assert all(isinstance(b.asm["ptx"], str) and ".target sm_90" in b.asm["ptx"] for b in blobs)
    assert all(b.metadata["target"] == ("cuda", 90, 32) for b in blobs)
    # Every index is a different kernel, so no two cubins may be the same.
    assert len({b.cubin for b in blobs}) == 8


def test_check_blobs_rejects_non_elf() -> None:
    bad = triton_batch.CompiledKernelBlob(0, "k", {"cubin": b"nope"}, {})
    with pytest.raises(ValueError, match="not an ELF"):
        triton_batch.check_blobs([bad])

"""A batch of real Triton kernel compiles, as a job any process pool can run.

`compile_kernel` is a module-level function, so shmpool's SubprocPool, torch's
SubprocPool and a ProcessPoolExecutor can all pickle it by reference. It compiles
one Triton kernel for an explicit GPU target, which needs Triton's bundled LLVM and
ptxas but no GPU, so the batch benchmark runs on CPU-only machines too.

Only triton is imported, never torch: the pool benchmark uses this module to hold
shmpool beside torch's pool without making torch a dependency of the comparison
job itself. triton is imported lazily inside the job so importing this module (in
the parent, to name the job) costs nothing.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any, Protocol

# Kernel `index` picks its BLOCK from this table and its SCALE from the index
# itself, so every index in a batch is a distinct compile: a batch of 16 never
# degenerates into 6 compiles and 10 cache hits.
_BLOCKS = (64, 128, 256, 512, 1024, 2048)

# Hopper, 32 threads a warp: a target every Triton 3.x NVIDIA backend supports.
DEFAULT_ARCH = 90
WARP_SIZE = 32

# The magic every cubin (an ELF file) starts with: the check a caller can make
# that the bytes that came back are a real kernel.
ELF_MAGIC = b"\x7fELF"

# A batch of 16 takes about 2 s on 2 cores; a wait of ten minutes means a hung
# worker, not a slow compile.
DEFAULT_BATCH_TIMEOUT = 600.0


@dataclasses.dataclass(frozen=True)
class CompiledKernelBlob:
    """What one compile sends back: every stage of the kernel and its metadata.

    `asm` maps stage name to its text or bytes ("ttir", "ttgir", "llir", "ptx" as str,
    "cubin" as bytes); `metadata` is Triton's KernelMetadata as a plain dict so it
    unpickles without Triton's classes.
    """

    index: int
    name: str
    asm: dict[str, str | bytes]
    metadata: dict[str, Any]

    @property
    def cubin(self) -> bytes:
        return self.asm["cubin"]  # type: ignore[return-value]


class _Submitter(Protocol):
    """Anything with concurrent.futures' submit: shmpool, torch's SubprocPool, PPE."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]: ...


def _kernel_fn() -> Any:
    # Defined on first use rather than at import: @triton.jit needs triton at
    # definition time, and the parent that only names the job should not pay
    # for importing it. The source lives in this file, which @triton.jit needs.
    global _KERNEL
    if _KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def scaled_exp_mul(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr, SCALE: tl.constexpr):  # type: ignore[no-untyped-def]
            pid = tl.program_id(0)
            offs = pid * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n
            x = tl.load(x_ptr + offs, mask=mask)
            y = tl.load(y_ptr + offs, mask=mask)
            tl.store(out_ptr + offs, tl.exp(x) * y + x * SCALE, mask=mask)

        _KERNEL = scaled_exp_mul
    return _KERNEL


_KERNEL: Any = None


def compile_kernel(index: int, cache_dir: str | None = None, arch: int = DEFAULT_ARCH) -> CompiledKernelBlob:
    """Compile kernel number `index` for CUDA sm_`arch`; return its stages and metadata.

    `cache_dir` points Triton's on-disk cache somewhere fresh, so a benchmark
    measures compiles and not cache hits from an earlier run. It is set through
    the environment because that is where Triton's knobs read it on every compile,
    and it stays set in the worker for later jobs (a worker serves one benchmark).
    """
    if cache_dir is not None:
        os.environ["TRITON_CACHE_DIR"] = cache_dir
    import triton
    from triton.backends.compiler import GPUTarget

    src = triton.compiler.ASTSource(
        fn=_kernel_fn(),
        signature={
            "x_ptr": "*fp32",
            "y_ptr": "*fp32",
            "out_ptr": "*fp32",
            "n": "i32",
            "BLOCK": "constexpr",
            "SCALE": "constexpr",
        },
        constexprs={"BLOCK": _BLOCKS[index % len(_BLOCKS)], "SCALE": index},
    )
    # enable_fp_fusion is passed explicitly: left unset, Triton 3.9 warns on every
    # compile that its default is about to change (TRITON_DEFAULT_FP_FUSION).
    compiled = triton.compile(
        src, target=GPUTarget("cuda", arch, WARP_SIZE), options={"enable_fp_fusion": True}
    )
    metadata = compiled.metadata._asdict()
    # GPUTarget is a Triton class; a tuple keeps the result loadable anywhere.
    target = metadata.get("target")
    if target is not None:
        metadata["target"] = (target.backend, target.arch, target.warp_size)
    return CompiledKernelBlob(index, compiled.name, dict(compiled.asm), metadata)


def compile_batch(
    pool: _Submitter,
    n: int,
    *,
    cache_dir: str | None = None,
    arch: int = DEFAULT_ARCH,
    timeout: float = DEFAULT_BATCH_TIMEOUT,
) -> list[CompiledKernelBlob]:
    """Submit `n` distinct kernel compiles to `pool` at once; return them in index order.

    `timeout` bounds the whole batch, not each kernel: the deadline is shared so a
    batch of n never waits n times the limit.
    """
    import time

    futures = [pool.submit(compile_kernel, i, cache_dir, arch) for i in range(n)]
    deadline = time.monotonic() + timeout
    return [f.result(timeout=max(0.0, deadline - time.monotonic())) for f in futures]


def check_blobs(blobs: Sequence[CompiledKernelBlob]) -> None:
    """Raise ValueError unless every blob holds a non-empty ELF cubin. Never returns a value."""
    for blob in blobs:
        cubin = blob.asm.get("cubin")
        if not isinstance(cubin, bytes) or not cubin.startswith(ELF_MAGIC):
            head = cubin[:8] if isinstance(cubin, (bytes, str)) else type(cubin).__name__
            raise ValueError(f"kernel {blob.index} ({blob.name}): cubin is not an ELF file (starts {head!r})")

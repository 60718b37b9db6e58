"""The frozen-fx workload: torch.compile of a frozen-weight MLP, its FX graph compiled in each pool.

One repetition is one real compile with empty inductor caches and a batch size not compiled
before (``freezing=True``, so the job carries every weight): torch pickles the FX job, the pool under test runs torch's own child
function on it, and the compiled model's first call is checked against eager. Through a shmpool
pool the job's storages go out of band (``shmpool._torch_fx_wire``); through the others, torch's
bytes. The floor is the same compile in-process, timed once per case after one untimed compile.

torch is imported only when a case is set up, so the benchmark loads without it.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

# prepacked mkldnn weights cannot be pickled to a worker: off for every pool and the floor alike.
INDUCTOR_CONFIG = {"freezing": True, "cpp.weight_prepack": False, "compile_threads": 1}
TOLERANCE = 1e-3


class FrozenMLP:
    """A frozen-weight model and a fresh input for each compile of it.

    Every compile gets a new batch size, so its kernels are new code: neither the parent nor a
    worker that compiled this model before can answer from an in-memory cache (torch's child
    clears inductor's caches, not every one of them), and every repetition is a real compile."""

    def __init__(self, layers: int, width: int) -> None:
        import torch

        g = torch.Generator().manual_seed(0)
        mods: list[Any] = []
        with torch.no_grad():
            for i in range(layers):
                lin = torch.nn.Linear(width, width)
                lin.weight.normal_(0.0, 1.0 / width**0.5, generator=g)  # activations stay O(1) through layers
                mods += [lin, torch.nn.ReLU()] if i < layers - 1 else [lin]
        self.model = torch.nn.Sequential(*mods).eval()
        self.width = width
        self.weight_bytes = sum(p.untyped_storage().nbytes() for p in self.model.parameters())
        self._compiles = itertools.count(2)

    def next_input(self) -> tuple[Any, Any]:
        """``(input, eager output)`` with a batch size no compile has seen yet."""
        import torch

        x = torch.randn(next(self._compiles), self.width)
        with torch.no_grad():
            return x, self.model(x)


def make_model(layers: int, width: int) -> FrozenMLP:
    return FrozenMLP(layers, width)


@contextlib.contextmanager
def _fresh_compile() -> Iterator[None]:
    """Empty inductor caches and a reset dynamo, so every repetition compiles for real."""
    import torch
    import torch._inductor.config as cfg

    cache = tempfile.mkdtemp(prefix="shmpool-bench-fx-")
    saved = {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    os.environ["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")
    torch._dynamo.reset()
    try:
        with cfg.patch(INDUCTOR_CONFIG), torch.no_grad():
            yield
    finally:
        torch._dynamo.reset()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(cache, ignore_errors=True)


def _check(out: Any, expected: Any) -> None:
    import torch

    from shmpool.bench.workloads import WrongResult

    if not torch.allclose(out, expected, rtol=TOLERANCE, atol=TOLERANCE):
        raise WrongResult(f"wrong result: compiled output differs from eager by {(out - expected).abs().max():.3g}")


_warmed_in_this_process = False
# How long each warm-up job holds its worker, so that the next ones go to the others.
WARM_HOLD_S = 0.5


def warm_worker(hold_s: float) -> int:
    """Runs in a worker: one tiny inductor compile, once per process, so that a worker's first
    compile costs (imports, the toolchain probe, torch's source hash) are not in any repetition."""
    global _warmed_in_this_process
    if not _warmed_in_this_process:
        import torch

        with _fresh_compile():
            # A ReLU between two layers makes a C++ kernel: the toolchain is probed and used here.
            tiny = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8)).eval()
            torch.compile(tiny)(torch.randn(2, 8))
        _warmed_in_this_process = True
    time.sleep(hold_s)
    return os.getpid()


def warm_workers(pool: Any, workers: int, timeout: float) -> None:
    """Warm every worker of ``pool`` (best effort: jobs go where the pool sends them)."""
    futures = [pool.submit(warm_worker, WARM_HOLD_S) for _ in range(2 * workers)]
    for f in futures:
        f.result(timeout=timeout)


def compile_in_pool(pool: Any, payload: FrozenMLP, out_of_band: bool) -> None:
    """Compile ``payload``'s model with its FX graph sent to ``pool``; check it against eager."""
    import torch

    import shmpool.torch
    from shmpool import _torch_compat, _torch_fx_wire

    x, expected = payload.next_input()
    shmpool.torch.clear_fx_compile_counts()
    with _fresh_compile(), _torch_compat.fx_process_pool_as(pool), \
            _torch_fx_wire.enabled(out_of_band), shmpool.torch.subprocess_fx_compile():
        out = torch.compile(payload.model)(x)
    counts = shmpool.torch.fx_compile_counts()
    if counts.get("_SubprocessFxCompile", 0) != 1 or counts.get("_InProcessFxCompile", 0):
        raise RuntimeError(f"expected one compile in the pool, saw {counts}")
    _check(out, expected)


def compile_in_process(payload: FrozenMLP) -> float:
    import torch

    x, expected = payload.next_input()
    with _fresh_compile():
        t0 = time.perf_counter()
        out = torch.compile(payload.model)(x)
        dt = time.perf_counter() - t0
    _check(out, expected)
    return dt


def in_process_seconds(payload: FrozenMLP) -> float:
    """The floor: the same compile and first call in this process, after one untimed compile
    (as every pool gets one: first-compile costs such as inductor's lazy imports are not the floor)."""
    compile_in_process(payload)
    return compile_in_process(payload)

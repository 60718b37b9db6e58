"""The frozen-fx workload: torch.compile of a frozen-weight MLP, its FX graph compiled in each pool.

One repetition is one real compile with empty inductor caches (``freezing=True``, so the job
carries every weight): torch pickles the FX job, the pool under test runs torch's own child
function on it, and the compiled model's first call is checked against eager. Through a shmpool
pool the job's storages go out of band (``shmpool._torch_fx_wire``); through the others, torch's
bytes. The floor is the same compile in-process, timed once per case.

torch is imported only when a case is set up, so the benchmark loads without it.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

# prepacked mkldnn weights cannot be pickled to a worker: off for every pool and the floor alike.
INDUCTOR_CONFIG = {"freezing": True, "cpp.weight_prepack": False, "compile_threads": 1}
TOLERANCE = 1e-3


def make_model(layers: int, width: int) -> tuple[Any, Any, Any]:
    """``(model, input, eager output)``: ``layers`` square fp32 Linear layers, ReLUs between."""
    import torch

    g = torch.Generator().manual_seed(0)
    mods: list[Any] = []
    with torch.no_grad():
        for i in range(layers):
            lin = torch.nn.Linear(width, width)
            lin.weight.normal_(0.0, 1.0 / width**0.5, generator=g)  # activations stay O(1) through layers
            mods += [lin, torch.nn.ReLU()] if i < layers - 1 else [lin]
        model = torch.nn.Sequential(*mods).eval()
        x = torch.randn(2, width, generator=g)
        return model, x, model(x)


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


def compile_in_pool(pool: Any, payload: tuple[Any, Any, Any], out_of_band: bool) -> None:
    """Compile ``payload``'s model with its FX graph sent to ``pool``; check it against eager."""
    import torch

    import shmpool.torch
    from shmpool import _torch_compat, _torch_fx_wire

    model, x, expected = payload
    shmpool.torch.clear_fx_compile_counts()
    with _fresh_compile(), _torch_compat.fx_process_pool_as(pool), \
            _torch_fx_wire.enabled(out_of_band), shmpool.torch.subprocess_fx_compile():
        out = torch.compile(model)(x)
    counts = shmpool.torch.fx_compile_counts()
    if counts.get("_SubprocessFxCompile", 0) != 1 or counts.get("_InProcessFxCompile", 0):
        raise RuntimeError(f"expected one compile in the pool, saw {counts}")
    _check(out, expected)


def in_process_seconds(payload: tuple[Any, Any, Any]) -> float:
    """The floor: the same compile and first call, in this process."""
    import torch

    model, x, expected = payload
    with _fresh_compile():
        t0 = time.perf_counter()
        out = torch.compile(model)(x)
        dt = time.perf_counter() - t0
    _check(out, expected)
    return dt

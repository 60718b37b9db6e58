"""Frozen weights through a subprocess FX compile: each storage crosses once, out of band, in place.

torch pickles an FX job's weights twice (graph constants, and the parameters of the module kept
in the tracing context), each through torch.save. With shmpool installed the job carries each
distinct storage once, as an out-of-band buffer the worker maps instead of parsing.
"""

from __future__ import annotations

import io
import operator
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import fxjobs  # noqa: E402
import shmpool.torch  # noqa: E402
from shmpool import _torch_compat, _torch_fx_wire  # noqa: E402

pytestmark = pytest.mark.torch

nn = torch.nn

WIDTH = 1024  # two 1024x1024 fp32 layers: 8 MiB of weights, a few seconds to compile
# Rings for the one-off case: a payload over half the ring goes through its own memfd.
SMALL_RING = 4 << 20
# The payload is the weights plus the pickle stream around them (graph, config, context).
PAYLOAD_SLACK = 1.10
# Copies per payload byte on the way in: the parent's one write, plus the in-band stream's read.
MAX_COPIES_PER_BYTE = 1.05


class FrozenMLP(nn.Module):
    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: Any) -> Any:
        return self.fc2(torch.relu(self.fc1(x)))


def _weight_bytes(model: nn.Module) -> int:
    return sum(p.untyped_storage().nbytes() for p in model.parameters())


# --- the pickler alone, no pool --------------------------------------------------------------


def _round_trip(obj: object) -> tuple[object, list[Any]]:
    """Pickle as the parent does, unpickle as the worker does (buffers used as they are)."""
    file = io.BytesIO()
    pickler = _torch_compat.graph_pickler_dump(_torch_fx_wire._OutOfBandGraphPickler, obj, file)
    token = _torch_fx_wire._current.set(_torch_fx_wire._Storages(pickler.buffers))
    try:
        return pickle.loads(file.getvalue()), pickler.buffers
    finally:
        _torch_fx_wire._current.reset(token)


def test_each_storage_crosses_once_and_is_used_in_place() -> None:
    weight = nn.Parameter(torch.randn(64, 32))
    other = torch.arange(10, dtype=torch.float64)
    # Three tensor objects over weight's storage (as a frozen graph constant, its transpose and
    # the module's parameter are), one over other's, and an empty one.
    obj = {"param": weight, "t": weight.detach().t(), "row": weight.detach()[3], "other": other, "empty": torch.empty(0)}
    back, buffers = _round_trip(obj)
    assert isinstance(back, dict)

    assert len(buffers) == 3  # weight, other, the empty storage
    assert [memoryview(b).nbytes for b in buffers] == [64 * 32 * 4, 10 * 8, 0]
    for name in ("param", "t", "row", "other"):
        torch.testing.assert_close(back[name], obj[name], rtol=0, atol=0)
    assert type(back["param"]) is nn.Parameter
    # One storage on the far side too, and it is the buffer itself, not a copy of it.
    storage = back["param"].untyped_storage()
    assert back["t"].untyped_storage().data_ptr() == storage.data_ptr()
    assert back["row"].data_ptr() == storage.data_ptr() + 3 * 32 * 4
    buffer = torch.frombuffer(buffers[0], dtype=torch.uint8)
    assert storage.data_ptr() == buffer.data_ptr()
    assert back["empty"].numel() == 0


def test_storage_outside_its_job_is_refused() -> None:
    file = io.BytesIO()
    _torch_compat.graph_pickler_dump(_torch_fx_wire._OutOfBandGraphPickler, torch.ones(3), file)
    with pytest.raises(pickle.UnpicklingError, match="outside OutOfBandPickledInput"):
        pickle.loads(file.getvalue())


def test_install_patches_serialize_and_uninstall_restores_it() -> None:
    cls = _torch_fx_wire._WireProtocolInput
    torch_own = cls.__dict__["serialize"]
    assert not shmpool.torch.is_installed()
    with shmpool.torch.installed():
        assert cls.__dict__["serialize"] is _torch_fx_wire.serialize
    assert cls.__dict__["serialize"] is torch_own
    _torch_compat.drop_pools()


# --- a real compile in the worker ------------------------------------------------------------


@pytest.fixture(params=["ring", "oneoff"], scope="module")
def fx_pool(request: pytest.FixtureRequest) -> Iterator[tuple[str, Any]]:
    """shmpool installed with its FX pool built: a 1 GiB ring, or rings so small that the
    payload needs a one-off memfd."""
    _torch_compat.drop_pools()
    shmpool.torch.install(ring_size=SMALL_RING if request.param == "oneoff" else shmpool.torch.DEFAULT_TORCH_RING_SIZE)
    pool = shmpool.torch.fx_process_pool()
    # Ready before the compile, as a pool is after its first job: a job that has to wait for a
    # starting worker keeps a private copy instead (a staged memfd at this size), which is not
    # the path under test.
    pool.submit(operator.add, 1, 1).result(timeout=300)
    try:
        yield request.param, pool
    finally:
        shmpool.torch.uninstall()
        shmpool.torch.TorchSubprocPool.ring_size = shmpool.torch.DEFAULT_TORCH_RING_SIZE


def test_frozen_model_compiles_in_worker_with_weights_out_of_band(
    fx_pool: tuple[str, Any], fresh_inductor: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "freezing", True)
    monkeypatch.setattr(inductor_config.cpp, "weight_prepack", False)  # mkldnn blobs cannot be pickled
    where, pool = fx_pool
    torch.manual_seed(0)
    model = FrozenMLP().eval()
    weights = _weight_bytes(model)
    x = torch.randn(2, WIDTH)
    before, wire_before = pool.stats(), shmpool.torch.fx_wire_stats()
    with torch.no_grad(), shmpool.torch.subprocess_fx_compile():
        expected = model(x)
        actual = torch.compile(model)(x)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)

    counts = shmpool.torch.fx_compile_counts()
    assert counts.get("_InProcessFxCompile", 0) == 0, counts
    assert counts.get("_SubprocessFxCompile", 0) == 1, counts

    after, wire = pool.stats(), shmpool.torch.fx_wire_stats()
    assert wire.jobs - wire_before.jobs == 1
    # Four storages (two weights, two biases), each once, though the graph and the module kept
    # in the tracing context both refer to them.
    assert wire.storages - wire_before.storages == 4
    assert wire.storage_bytes - wire_before.storage_bytes == weights
    assert wire.storage_refs - wire_before.storage_refs > wire.storages - wire_before.storages
    sent = after.bytes_to_workers - before.bytes_to_workers
    copied = after.copied_to_workers - before.copied_to_workers
    assert weights <= sent <= PAYLOAD_SLACK * weights, (sent, weights)  # 1x the weights, not 2x
    assert copied <= MAX_COPIES_PER_BYTE * sent, (copied, sent)
    assert after.oneoff_segments - before.oneoff_segments == (1 if where == "oneoff" else 0)
    assert after.jobs_completed - before.jobs_completed == 1
    # The result carries no weights back.
    assert after.bytes_from_workers - before.bytes_from_workers < weights / 4

    # Nothing of the job outlives it in the worker: no tensor over its slot, no one-off mapping.
    assert pool.submit(fxjobs.live_tensors, WIDTH * WIDTH).result(timeout=60) == []
    assert sorted(pool.submit(fxjobs.shared_mappings).result(timeout=60)) == [
        "/memfd:shmpool-request",
        "/memfd:shmpool-response",
    ]

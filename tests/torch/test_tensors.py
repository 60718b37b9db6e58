"""torch CPU tensors through shmpool's picklers: storages go out of band, tensors come back equal."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from shmpool import CloudPickler, SubprocPickler, SubprocKind, SubprocPool  # noqa: E402
from shmpool.codec import dump, load  # noqa: E402

pytestmark = pytest.mark.torch

PICKLERS = [SubprocPickler(), CloudPickler()]


def _round_trip(obj: object, pickler: SubprocPickler, copy_buffers: bool = True) -> object:
    parts = dump(obj, pickler)
    region = memoryview(bytearray(parts.size))
    parts.write_into(region)
    return load(region, pickler, copy_buffers=copy_buffers)[0]


@pytest.mark.parametrize("pickler", PICKLERS, ids=["plain", "cloud"])
def test_tensors_come_back_equal_with_their_layout(pickler: SubprocPickler) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    objs = {
        "plain": base,
        "view": base[1:, ::2],  # an offset and strides into a shared storage
        "transposed": base.t(),
        "bf16": torch.randn(5, dtype=torch.bfloat16),
        "int": torch.tensor([1, -2, 3], dtype=torch.int64),
        "empty": torch.empty(0, 3),
        "param": torch.nn.Parameter(torch.ones(3)),
        "grad": torch.zeros(2, requires_grad=True),
    }
    got = _round_trip(objs, pickler)
    for name, t in objs.items():
        g = got[name]  # type: ignore[index]
        assert type(g) is type(t), name
        assert g.dtype == t.dtype and g.shape == t.shape and g.stride() == t.stride(), name
        assert g.requires_grad == t.requires_grad, name
        assert torch.equal(g.detach(), t.detach()), name


def test_storage_bytes_go_out_of_band() -> None:
    weights = torch.randn(1 << 20)  # 4 MiB
    parts = dump(weights, SubprocPickler())
    assert parts.oob_bytes == weights.nbytes  # the storage rides beside the stream, not in it
    assert parts.stream_len < 4096


def test_a_job_argument_tensor_is_used_in_place_and_results_come_back() -> None:
    weights = torch.randn(1 << 20)
    with SubprocPool(1, kind=SubprocKind.SPAWN) as pool:
        total = pool.submit(torch.sum, weights).result(120)
        doubled = pool.submit(torch.mul, weights, 2).result(120)
        stats = pool.stats()
    assert torch.allclose(total, weights.sum())
    assert torch.equal(doubled, weights * 2)
    assert stats.copied_to_workers / stats.bytes_to_workers < 1.05  # about one copy per byte

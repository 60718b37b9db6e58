"""torch.compile with FX graphs compiled in a shmpool worker (subprocess FX mode).

Every test compiles for real with empty caches and checks three things: the
compiled model matches eager, the compile went to a worker (none fell back to
in-process), and the worker was shmpool's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import shmpool.torch  # noqa: E402

pytestmark = pytest.mark.torch

nn = torch.nn

# Payload bound for the frozen model: the brief's bar is a job over 100 MB.
BIG_PAYLOAD_BYTES = 100 * 10**6


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))

    def forward(self, x: Any) -> Any:
        return self.net(x)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: Any) -> Any:
        return torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))


class NormAttention(nn.Module):
    """Reductions, softmax and a matmul: several fused kernels in one graph."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.qkv = nn.Linear(16, 48)

    def forward(self, x: Any) -> Any:
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)
        return attn @ v, x.sum(dim=-1)


def _elementwise(x: Any, y: Any) -> Any:
    return torch.where(x > 0, torch.exp(-x) * y, torch.tanh(y)) + x.cumsum(0)


# (name, build(), inputs()) -- each a different kind of graph, all small.
CASES: list[tuple[str, Callable[[], Any], Callable[[], tuple[Any, ...]]]] = [
    ("mlp", lambda: MLP().eval(), lambda: (torch.randn(4, 32),)),
    ("convnet", lambda: ConvNet().eval(), lambda: (torch.randn(2, 3, 16, 16),)),
    ("norm_attention", lambda: NormAttention().eval(), lambda: (torch.randn(2, 5, 16),)),
    ("elementwise", lambda: _elementwise, lambda: (torch.randn(33), torch.randn(33))),
]


def _assert_compiled_in_worker(expected_graphs: int = 1) -> None:
    counts = shmpool.torch.fx_compile_counts()
    assert counts.get("_InProcessFxCompile", 0) == 0, counts
    assert counts.get("_SubprocessFxCompile", 0) == expected_graphs, counts


@pytest.mark.parametrize(("name", "build", "inputs"), CASES, ids=[c[0] for c in CASES])
def test_compiled_output_matches_eager(
    subprocess_fx: Any, name: str, build: Callable[[], Any], inputs: Callable[[], tuple[Any, ...]]
) -> None:
    torch.manual_seed(0)
    model, args = build(), inputs()
    pool = subprocess_fx.fx_process_pool()
    before = pool.stats()
    with torch.no_grad():
        expected = model(*args)
        actual = torch.compile(model)(*args)
    torch.testing.assert_close(actual, expected)
    _assert_compiled_in_worker()
    assert type(pool) is shmpool.torch.TorchSubprocPool
    after = pool.stats()
    assert after.jobs_completed == before.jobs_completed + 1
    assert after.jobs_failed == before.jobs_failed


class FrozenBig(nn.Module):
    """Two 4096x4096 fp32 layers: 134 MB of weights that freezing turns into constants."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4096, 4096)
        self.fc2 = nn.Linear(4096, 4096)

    def forward(self, x: Any) -> Any:
        return self.fc2(torch.relu(self.fc1(x)))


def test_frozen_weights_payload_over_100mb(subprocess_fx: Any, inductor_patch: Callable[..., None]) -> None:
    # Freezing folds the weights into the graph as constants, so the pickled graph
    # sent to the worker carries all of them; prepacking would turn them into
    # mkldnn blobs the subprocess path cannot pickle.
    inductor_patch(**{"freezing": True, "cpp.weight_prepack": False})
    torch.manual_seed(0)
    model = FrozenBig().eval()
    x = torch.randn(2, 4096)
    pool = subprocess_fx.fx_process_pool()
    before = pool.stats()
    with torch.no_grad():
        expected = model(x)
        actual = torch.compile(model)(x)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    _assert_compiled_in_worker()
    after = pool.stats()
    sent = after.bytes_to_workers - before.bytes_to_workers
    assert sent > BIG_PAYLOAD_BYTES, f"payload was only {sent} bytes"
    assert after.jobs_completed == before.jobs_completed + 1

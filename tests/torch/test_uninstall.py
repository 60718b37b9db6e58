"""uninstall() gives torch its own pool back, and torch's subprocess compile still works.

Its own module so that no module-scoped install() is active while it runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import shmpool.torch  # noqa: E402
from shmpool import _torch_compat  # noqa: E402

pytestmark = pytest.mark.torch


def test_uninstall_gives_torch_its_pool_back(fresh_inductor: Path) -> None:
    assert not shmpool.torch.is_installed()
    with shmpool.torch.installed():
        ours = shmpool.torch.fx_process_pool()
        assert type(ours) is shmpool.torch.TorchSubprocPool
    # uninstall() shut our pool down and dropped torch's cached reference to it.
    with pytest.raises(RuntimeError):
        ours.submit(os.getpid)

    # A real subprocess compile now goes through torch's own pool again.
    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x) * 2 + x

    x = torch.randn(64)
    try:
        with shmpool.torch.subprocess_fx_compile():
            out = torch.compile(f)(x)
        theirs = shmpool.torch.fx_process_pool()
        assert type(theirs) is _torch_compat.torch_pool_class()
        torch.testing.assert_close(out, f(x))
        counts = shmpool.torch.fx_compile_counts()
        assert counts.get("_SubprocessFxCompile", 0) == 1
        assert counts.get("_InProcessFxCompile", 0) == 0
    finally:
        # Leave no torch pool running into the next test.
        _torch_compat.drop_pools()

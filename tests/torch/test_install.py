"""install()/uninstall(): which pool class torch builds, and how workers are set up."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import shmpool  # noqa: E402
import shmpool.torch  # noqa: E402
from shmpool import _torch_compat  # noqa: E402

pytestmark = pytest.mark.torch

# A spawned worker imports torch in ~5 s on 2 cores; far past that is a hang.
COMPILE_DEADLINE_S = 300.0

REPO = Path(__file__).resolve().parents[2]
# A fresh interpreter importing shmpool (and, when asked, torch) takes a few seconds.
SUBPROCESS_DEADLINE_S = 120.0


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=SUBPROCESS_DEADLINE_S,
    )


def test_import_shmpool_does_not_import_torch() -> None:
    r = _run_python("""
        import sys, shmpool
        shmpool.SubprocPool
        assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
    """)
    assert r.returncode == 0, r.stderr


def test_import_shmpool_torch_without_torch_names_the_extra() -> None:
    # sys.modules["torch"] = None makes `import torch` raise ImportError, as on a
    # machine without torch, without uninstalling anything.
    r = _run_python("""
        import sys
        sys.modules["torch"] = None
        try:
            import shmpool.torch
        except ImportError as e:
            print(str(e))
        else:
            raise SystemExit("imported without torch")
    """)
    assert r.returncode == 0, r.stderr
    assert "pip install shmpool[torch]" in r.stdout


def test_check_supported_names_what_is_missing_and_the_supported_range(monkeypatch: pytest.MonkeyPatch) -> None:
    real = _torch_compat._import

    def torch_without_the_initializer(name: str) -> object:
        if name == "torch._inductor.compile_worker.utils":
            return types.SimpleNamespace()  # as a torch that moved _async_compile_initializer
        return real(name)

    monkeypatch.setattr(_torch_compat, "_import", torch_without_the_initializer)
    with pytest.raises(ImportError) as info:
        _torch_compat.check_supported()
    msg = str(info.value)
    assert "torch._inductor.compile_worker.utils._async_compile_initializer" in msg
    assert "supports torch >=2.13,<2.15" in msg
    assert "2.13.0" in msg and "2.14.1" in msg  # the releases it was run against


def test_install_is_idempotent_and_uninstall_restores() -> None:
    original = _torch_compat.pool_globals()
    assert all(cls is _torch_compat.torch_pool_class() for cls in original.values())
    try:
        shmpool.torch.install()
        shmpool.torch.install()
        assert shmpool.torch.is_installed()
        assert set(_torch_compat.pool_globals().values()) == {shmpool.torch.TorchSubprocPool}
    finally:
        shmpool.torch.uninstall()
        shmpool.torch.uninstall()
    assert not shmpool.torch.is_installed()
    assert _torch_compat.pool_globals() == original


def test_installed_context_manager_nests() -> None:
    with shmpool.torch.installed():
        with shmpool.torch.installed():
            assert shmpool.torch.is_installed()
        # The inner block found it installed, so it leaves it installed.
        assert shmpool.torch.is_installed()
    assert not shmpool.torch.is_installed()


def test_pool_class_is_both_shmpool_and_torch() -> None:
    cls = shmpool.torch.TorchSubprocPool
    assert issubclass(cls, shmpool.SubprocPool)
    assert issubclass(cls, _torch_compat.torch_pool_class())


def test_fx_pool_is_shmpool_and_workers_are_set_up_like_torchs(
    shm_installed: Any, fresh_inductor: Path
) -> None:
    pool = shm_installed.fx_process_pool()
    assert type(pool) is shmpool.torch.TorchSubprocPool
    # Same pool on every call: torch caches it, and install() must not defeat that.
    assert shm_installed.fx_process_pool() is pool

    probe = pool.submit(_torch_compat.worker_probe).result(timeout=COMPILE_DEADLINE_S)
    parent_key = _torch_compat.parent_worker_state()[1]
    assert probe["pid"] != os.getpid()
    assert probe["pid"] in pool.worker_pids()
    assert probe["torch_key"] == parent_key
    assert probe["in_toplevel_process"] is False
    assert probe["env"]["TORCH_WARM_POOL"] == "0"
    assert probe["env"]["TORCHINDUCTOR_CACHE_DIR"] == os.environ["TORCHINDUCTOR_CACHE_DIR"]
    assert probe["env"]["TRITON_CACHE_DIR"] == os.environ["TRITON_CACHE_DIR"]

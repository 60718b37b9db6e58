"""Fixtures for the torch glue tests: real torch, real torch.compile, no mocks.

torch is imported lazily so this file loads (and the tests skip, each module with
pytest.importorskip) on a machine installed without the torch extra.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

HAVE_TORCH = importlib.util.find_spec("torch") is not None

# One spawned worker imports torch and inductor in about 5 s on the 2-core CI
# machine; a compile of the small models here takes a few seconds more. A wait
# longer than this is a hang, not a slow machine.
COMPILE_DEADLINE_S = 300.0


@pytest.fixture
def inductor_patch() -> Iterator[Callable[..., None]]:
    """`inductor_patch(**settings)`: set inductor config options until the test ends.

    Through torch's own `config.patch`, not monkeypatch: on torch 2.14 putting an option
    back with setattr after monkeypatch's undo leaves the config module without it.
    Dotted names reach nested options: `inductor_patch(**{"cpp.weight_prepack": False})`.
    """
    import torch._inductor.config as inductor_config

    with ExitStack() as stack:
        yield lambda **settings: stack.enter_context(inductor_config.patch(settings))


@pytest.fixture
def fresh_inductor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inductor_patch: Callable[..., None]
) -> Iterator[Path]:
    """Empty inductor and Triton caches and a reset dynamo, so every compile really runs.

    A cache hit would skip the worker and hide whether the subprocess path works.
    compile_threads=1 keeps inductor from warming its async kernel-compile pool on
    every compile: on CPU that pool only ever runs a readiness no-op, and starting
    two workers for it per test would double the test time on 2 cores. Tests of
    that pool set compile_threads themselves.
    """
    import torch

    cache = tmp_path / "inductor-cache"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache / "triton"))
    inductor_patch(compile_threads=1)
    torch._dynamo.reset()
    import shmpool.torch

    shmpool.torch.clear_fx_compile_counts()
    yield cache
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def shm_installed() -> Iterator[Any]:
    """shmpool installed for a whole test module: one FX worker serves all its compiles.

    Torch's FX pool is cached for the life of the process, so a module-scoped install
    mirrors real use; the per-test cache dir still reaches the worker through the
    job's extra_env.
    """
    import shmpool.torch

    shmpool.torch.install()
    yield shmpool.torch
    shmpool.torch.uninstall()


@pytest.fixture
def subprocess_fx(shm_installed: Any, fresh_inductor: Path) -> Iterator[Any]:
    """shmpool installed and FX compiles sent to a worker for this test."""
    with shm_installed.subprocess_fx_compile():
        yield shm_installed

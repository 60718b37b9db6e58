"""A job that raises in a worker of a pool torch built fails with torch's own SubprocException.

inductor's async_compile wraps every kernel future in
``except SubprocException as e: raise e.with_name(kernel_name) from e`` against torch's class,
so the error a TorchSubprocPool raises must be torch's class (and shmpool's), keep torch's
message format, and keep its class through ``with_name`` and pickling.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import shmpool  # noqa: E402
import shmpool.torch  # noqa: E402
from shmpool import _torch_compat  # noqa: E402
from shmpool.torch import TorchSubprocException, TorchSubprocPool  # noqa: E402

pytestmark = pytest.mark.torch

REPO = Path(__file__).resolve().parents[2]

TorchSubprocExc = _torch_compat.torch_subproc_exception_class()
# A spawned or forked worker imports torch and inductor in ~5 s on 2 cores; far past it is a hang.
JOB_DEADLINE_S = 300.0
DETAILS = 'Traceback (most recent call last):\n  File "job.py", line 1, in job\nValueError: no good\n'


def _raise_value_error(text: str) -> None:
    raise ValueError(text)


def test_exception_is_torchs_and_shmpools_with_torchs_message() -> None:
    e = TorchSubprocException(DETAILS, "ValueError")
    assert isinstance(e, TorchSubprocExc)
    assert isinstance(e, shmpool.SubprocException)
    assert (e.details, e.name) == (DETAILS, "ValueError")
    assert str(e) == str(TorchSubprocExc(DETAILS, "ValueError"))
    assert str(TorchSubprocException(DETAILS)) == str(TorchSubprocExc(DETAILS))  # name="<unknown>"


def test_with_name_keeps_the_class_and_torchs_message() -> None:
    named = TorchSubprocException(DETAILS, "ValueError").with_name("triton_poi_fused_add_0")
    assert type(named) is TorchSubprocException
    assert (named.details, named.name) == (DETAILS, "triton_poi_fused_add_0")
    assert str(named) == str(TorchSubprocExc(DETAILS).with_name("triton_poi_fused_add_0"))


def test_exception_pickles_to_the_same_class_and_fields() -> None:
    e = TorchSubprocException(DETAILS, "kernel_0")
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is TorchSubprocException
    assert (back.details, back.name, str(back)) == (e.details, e.name, str(e))


@pytest.mark.parametrize("kind", [shmpool.SubprocKind.FORK, shmpool.SubprocKind.SPAWN], ids=["fork", "spawn"])
def test_torch_pool_job_error_is_torchs_and_carries_the_worker_traceback(
    fresh_inductor: Path, kind: shmpool.SubprocKind
) -> None:
    pool = TorchSubprocPool(1, kind=kind)
    try:
        fut = pool.submit(_raise_value_error, "no good in the worker")
        with pytest.raises(TorchSubprocExc) as info:
            fut.result(timeout=JOB_DEADLINE_S)
    finally:
        pool.shutdown()
    err = info.value
    assert type(err) is TorchSubprocException
    assert err.name == "ValueError"  # shmpool's name: the job's exception class
    assert "_raise_value_error" in err.details  # the worker's frames
    assert err.details.rstrip().endswith("ValueError: no good in the worker")
    assert str(err) == str(TorchSubprocExc(err.details, "ValueError"))


def test_plain_shmpool_pool_raises_torchs_exception_too_once_torch_is_loaded() -> None:
    """torch's own tests run on a plain shmpool.SubprocPool bound in (test_exception catches
    torch's class): with torch loaded, as here, every shmpool pool's error is torch's too."""
    with shmpool.SubprocPool(1, kind=shmpool.SubprocKind.SPAWN) as pool:
        with pytest.raises(shmpool.SubprocException) as info:
            pool.submit(_raise_value_error, "plain").result(timeout=JOB_DEADLINE_S)
    err = info.value
    assert isinstance(err, TorchSubprocExc) and type(err) is TorchSubprocException
    assert type(err.with_name("kernel_0")) is TorchSubprocException
    assert str(err) == str(TorchSubprocExc(err.details, "ValueError"))


def test_plain_shmpool_pool_without_torch_raises_shmpools_class_and_imports_no_torch() -> None:
    code = textwrap.dedent(
        f"""
        import operator, sys
        sys.path.insert(0, {str(REPO)!r})
        import shmpool
        with shmpool.SubprocPool(1, kind=shmpool.SubprocKind.SPAWN) as pool:
            err = pool.submit(operator.truediv, 1, 0).exception(timeout={JOB_DEADLINE_S})
        assert type(err) is shmpool.SubprocException, type(err)
        assert "torch" not in sys.modules
        print("ok", err.name)
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=2 * JOB_DEADLINE_S)
    assert r.returncode == 0 and r.stdout.split() == ["ok", "ZeroDivisionError"], r.stderr


@pytest.fixture
def async_subprocess_pool(
    shm_installed: Any, fresh_inductor: Path, inductor_patch: Callable[..., None]
) -> Any:
    inductor_patch(worker_start_method="subprocess", compile_threads=2)
    yield shm_installed
    _torch_compat.drop_pools()
    shm_installed.install()


def test_async_compile_names_the_failing_kernel(async_subprocess_pool: Any) -> None:
    pytest.importorskip("triton")
    from torch._inductor.async_compile import AsyncCompile

    AsyncCompile.wait_pool_ready(timeout=JOB_DEADLINE_S)
    assert type(AsyncCompile.process_pool()) is TorchSubprocPool
    # Unique source: inductor caches kernel futures by source text, failed ones included.
    source = f"This definitely doesn't compile {uuid.uuid4().hex}"
    future = AsyncCompile().triton("fake_kernel_name", source_code=source)
    with pytest.raises(TorchSubprocExc) as info:
        future.result()
    err = info.value
    assert type(err) is TorchSubprocException
    assert err.name == "fake_kernel_name"
    assert "\n\nName=fake_kernel_name\n" in str(err)
    assert "SyntaxError" in err.details  # the worker's own traceback came along
    # inductor raised it `from` the pool's error, which still carries shmpool's name.
    assert type(err.__cause__) is TorchSubprocException
    # The job's own exception class (PyCodeCache reports the bad source as a RuntimeError
    # caused by the SyntaxError), where torch's pool would say "<unknown>".
    assert err.__cause__.name == "RuntimeError"

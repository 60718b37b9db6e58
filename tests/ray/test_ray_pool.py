"""What is RayPool's own: actor deaths, the object store, the second node, the optional import."""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from rayutil import REMOTE_RESOURCE, SKIP_REASON, TEST_ACTOR_OPTIONS, store_objects

pytest.importorskip("ray", reason=SKIP_REASON)

import corejobs  # noqa: E402
import rayjobs  # noqa: E402
from corejobs import RESULT_TIMEOUT  # noqa: E402
from shmpool import SubprocException, WorkerDiedError, WorkerStartError  # noqa: E402
from shmpool.errors import remote_error_type  # noqa: E402
from shmpool.ray import RayPool  # noqa: E402
from shmpool.ray.pool import INLINE_LIMIT  # noqa: E402

# How a job can take its actor down with it. Ray reports no exit status for an actor, so
# each gives WorkerDiedError with exitcode None, and Ray's own words for the cause.
DEATHS = [
    pytest.param(corejobs.exit_now, (3,), id="exit-3"),
    pytest.param(rayjobs.kill_self, (signal.SIGKILL,), id="sigkill"),
    pytest.param(rayjobs.kill_self, (signal.SIGSEGV,), id="sigsegv"),
]


@pytest.mark.parametrize(("fn", "args"), DEATHS)
def test_a_dying_actor_fails_only_its_job_and_is_replaced(make_pool: Any, fn: Any, args: tuple[Any, ...]) -> None:
    pool = make_pool(2)
    slow = pool.submit(corejobs.sleep_then, 1.0, "done")
    time.sleep(0.2)
    with pytest.raises(WorkerDiedError) as info:
        pool.submit(fn, *args).result(RESULT_TIMEOUT)
    err = info.value
    assert type(err) is WorkerDiedError and err.exitcode is None and err.pid > 0
    assert f"worker pid {err.pid} died" in str(err) and "(Ray: " in str(err)
    assert slow.result(RESULT_TIMEOUT) == "done"
    assert pool.submit(corejobs.add, 1, 2).result(RESULT_TIMEOUT) == 3
    stats = pool.stats()
    assert stats.workers_died == 1 and stats.workers_started == 3


@pytest.mark.parametrize("size", [INLINE_LIMIT - 1024, INLINE_LIMIT, 16 << 20], ids=["inline", "limit", "16MiB"])
def test_big_arguments_go_through_the_object_store(make_pool: Any, size: int) -> None:
    pool = make_pool(1)
    assert pool.submit(rayjobs.length, b"x" * size).result(RESULT_TIMEOUT) == size
    assert pool.stats().oneoff_segments == (0 if size < INLINE_LIMIT - 512 else 1)


def test_shutdown_with_jobs_running_and_queued_resolves_all_and_leaves_no_object(make_pool: Any) -> None:
    pool = make_pool(1)
    payload = os.urandom(32 << 20)  # in the store while the job runs
    running = pool.submit(corejobs.sleep_then, 30, payload)
    queued = [pool.submit(corejobs.echo, payload) for _ in range(3)]
    time.sleep(1.0)
    assert store_objects()[0] >= 1
    started = time.monotonic()
    pool.shutdown()
    assert time.monotonic() - started < 10
    for f in (running, *queued):
        assert f.done()
        with pytest.raises(RuntimeError, match="SubprocPool closed"):
            f.result(0)
    # the make_pool fixture then waits for Ray's store to be empty


def test_a_pool_on_the_second_node_moves_bytes_between_stores(make_pool: Any, ray_cluster: Any) -> None:
    pool = make_pool(1, actor_options={**TEST_ACTOR_OPTIONS, "resources": {REMOTE_RESOURCE: 1}})
    assert pool.submit(rayjobs.node_id).result(RESULT_TIMEOUT) != ray_cluster.head_node.node_id
    payload = os.urandom(16 << 20)
    assert pool.submit(corejobs.echo, payload).result(RESULT_TIMEOUT) == payload


def test_a_job_error_is_subproc_exception_not_a_ray_error(pool: RayPool) -> None:
    with pytest.raises(SubprocException) as info:
        pool.submit(corejobs.boom, "no good").result(RESULT_TIMEOUT)
    assert type(info.value) is remote_error_type() and info.value.name == "ValueError"
    assert "ray" not in type(info.value).__module__


def test_import_shmpool_never_imports_ray() -> None:
    # Runs only where Ray is installed: there, nothing but an import of it could load it.
    code = "import sys, shmpool; assert 'ray' not in sys.modules, 'shmpool imported ray'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=RESULT_TIMEOUT)


def test_shmpool_ray_without_ray_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['ray'] = None\n"  # what an interpreter without Ray sees
        "try:\n    import shmpool.ray\nexcept ImportError as e:\n    print(e)\nelse:\n    raise SystemExit('imported')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, timeout=RESULT_TIMEOUT, capture_output=True, text=True)
    assert "pip install shmpool[ray]" in out.stdout


def test_an_actor_no_node_can_host_fails_the_queue_with_the_reason(make_pool: Any) -> None:
    pool = make_pool(1, actor_options={**TEST_ACTOR_OPTIONS, "resources": {"no_such_resource": 1}}, start_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(WorkerStartError, match="not scheduled and set up within 1.0 s.*no_such_resource"):
        pool.submit(corejobs.add, 1, 1).result(RESULT_TIMEOUT)
    assert time.monotonic() - started < RESULT_TIMEOUT


def test_bad_arguments_and_unpicklable_jobs_are_refused_as_by_subproc_pool(make_pool: Any) -> None:
    # The same checks (shmpool/arguments.py) as SubprocPool: refused in the caller's call, named.
    with pytest.raises(TypeError, match="nprocs must be an int, got str '2'"):
        RayPool("2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="env must map variable names to str values"):
        RayPool(1, env={"X": 1})  # type: ignore[dict-item]
    pool = make_pool(1)
    with pytest.raises((AttributeError, pickle.PicklingError)) as caught:
        pool.submit(lambda x: x, 1)
    assert any("pickler=shmpool.CloudPickler()" in note for note in caught.value.__notes__)
    with pytest.raises(TypeError, match="job_fn must be callable"):
        pool.submit(5)
    with pytest.raises(ValueError, match="timeout must be a number of seconds >= 0"):
        pool.submit_job(corejobs.add, (1, 2), timeout=-1)
    assert pool.stats().jobs_submitted == 0
    assert pool.submit(corejobs.add, 1, 2).result(RESULT_TIMEOUT) == 3

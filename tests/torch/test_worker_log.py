"""Workers of the pools torch builds write where torch's own workers write.

torch decides once per pool: `config.worker_suppress_logging` (on by default) sends worker
output to os.devnull; else TORCHINDUCTOR_WORKER_LOGPATH (`torchinductor_worker_logpath`)
names a file, emptied when the pool is built; else the workers keep the parent's stdout and
stderr. Every test here asserts what was (or was not) written, so a pool that writes nowhere
fails it.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import shmpool  # noqa: E402
from shmpool.torch import TorchSubprocPool  # noqa: E402

pytestmark = pytest.mark.torch

# A worker imports torch and inductor in ~5 s on 2 cores; far past it is a hang.
JOB_DEADLINE_S = 300.0
KINDS = [shmpool.SubprocKind.FORK, shmpool.SubprocKind.SPAWN]


def _shout(marker: str) -> int:
    """Write `marker` every way a compile job might: print, stderr, and straight to fd 1."""
    print(f"stdout {marker}", flush=True)
    print(f"stderr {marker}", file=sys.stderr, flush=True)
    os.write(1, f"fd1 {marker}\n".encode())
    return os.getpid()


def _run_shout(kind: shmpool.SubprocKind) -> str:
    marker = uuid.uuid4().hex
    pool = TorchSubprocPool(1, kind=kind)
    try:
        pool.submit(_shout, marker).result(timeout=JOB_DEADLINE_S)
    finally:
        pool.shutdown()  # the worker exits, so all it wrote is out
    return marker


@pytest.fixture
def log_config(fresh_inductor: Path, inductor_patch: Callable[..., None]) -> Callable[[bool, str], None]:
    def set_config(suppress: bool, path: str) -> None:
        inductor_patch(worker_suppress_logging=suppress, torchinductor_worker_logpath=path)

    return set_config


@pytest.mark.parametrize("kind", KINDS, ids=["fork", "spawn"])
def test_worker_output_goes_to_torchinductor_worker_logpath(
    log_config, tmp_path: Path, kind: shmpool.SubprocKind, capfd: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "workers.log"
    log.write_text("left over from an earlier pool\n")
    log_config(False, str(log))
    marker = _run_shout(kind)
    text = log.read_text()
    for how in ("stdout", "stderr", "fd1"):
        assert f"{how} {marker}" in text, text
    assert "left over" not in text  # emptied when the pool was built, as torch opens it "w"
    assert marker not in capfd.readouterr().out


def test_suppressed_worker_output_goes_nowhere(log_config, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "workers.log"
    # Suppression wins over a log path, as in torch.
    log_config(True, str(log))
    marker = _run_shout(shmpool.SubprocKind.FORK)
    out, err = capfd.readouterr()
    assert marker not in out + err
    assert not log.exists()


def test_without_a_log_path_workers_share_the_parents_output(
    log_config, capfd: pytest.CaptureFixture[str]
) -> None:
    log_config(False, "")
    marker = _run_shout(shmpool.SubprocKind.FORK)
    out, err = capfd.readouterr()
    assert f"stdout {marker}" in out and f"fd1 {marker}" in out
    assert f"stderr {marker}" in err

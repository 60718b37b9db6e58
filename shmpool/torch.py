"""Make torch.compile's worker pools shmpool pools.

    import shmpool.torch
    shmpool.torch.install()        # or: with shmpool.torch.installed(): ...

After `install()`, the two pools inductor builds are shmpool pools:

- the subprocess FX-compile pool (TORCHINDUCTOR_FX_COMPILE_MODE=subprocess), whose
  job carries the whole graph, frozen weights included: torch's pickled graph with
  each distinct tensor storage taken out of it and written into shared memory once,
  which the worker compiles against in place (`shmpool._torch_fx_wire`);
- the async kernel-compile pool (config.worker_start_method = "subprocess"), still
  woken by `AsyncCompile.wakeup()`, because our pool class derives from torch's.

Workers are set up as torch's own (see `_torch_compat.init_worker`): a FORK pool's helper
first does what torch's sidecar does before it forks (imports inductor, runs
`pre_fork_setup()`), so its workers start as warm as torch's; their output goes where
torch sends its workers' (`worker_suppress_logging`, TORCHINDUCTOR_WORKER_LOGPATH). A job
that raises fails with `TorchSubprocException`, which is torch's SubprocException too, so
inductor's `except SubprocException as e: raise e.with_name(kernel_name)` still names the
kernel. Only pools built after `install()` are ours: a pool torch already built is shut
down and rebuilt on next use, so install before compiling. `uninstall()` gives torch its
own class back the same way.

All use of torch private names lives in `shmpool._torch_compat`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

try:
    import torch  # noqa: F401  (fail here, with the fix in the message, not deep in inductor)
except ImportError as e:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "shmpool.torch needs PyTorch, which is not installed: install the torch extra with "
        "`pip install shmpool[torch]`"
    ) from e

from shmpool import SubprocKind, SubprocPool
from shmpool import _torch_compat
from shmpool.errors import torch_flavoured

_torch_compat.check_supported()

from shmpool import _torch_fx_wire  # noqa: E402  (needs the torch names checked above)

__all__ = [
    "TorchSubprocException",
    "TorchSubprocPool",
    "async_compile_pool",
    "fx_compile_counts",
    "fx_process_pool",
    "fx_wire_stats",
    "install",
    "installed",
    "is_installed",
    "subprocess_fx_compile",
    "uninstall",
]

# Ring size (per direction per worker) for the pools torch builds. A subprocess FX
# job of a frozen model carries every weight, hundreds of MB: a payload over half
# the ring takes a fresh memfd each time, and faulting those shmem pages in costs
# more than the copy itself (268 MB: ~600 ms in a one-off segment, ~90 ms through
# a ring already touched). Ring pages are only allocated once touched, so pools of
# small kernel-compile jobs pay nothing for the size; touched pages stay resident
# until the worker stops (quiesce() or shutdown() gives them back).
DEFAULT_TORCH_RING_SIZE = 1 << 30


# What torch-built pools fail a raising job with: shmpool's SubprocException and torch's at once
# (see shmpool.errors.torch_flavoured). Every shmpool pool raises it once torch is loaded.
TorchSubprocException = torch_flavoured(_torch_compat.torch_subproc_exception_class())


class TorchSubprocPool(SubprocPool, _torch_compat.torch_pool_class()):  # type: ignore[misc]
    """A shmpool SubprocPool that inductor can build and recognise as its own.

    It takes torch's constructor arguments (torch's SubprocKind and pickler), and it
    is a subclass of torch's SubprocPool so every `isinstance(pool, SubprocPool)` in
    torch holds. shmpool's class comes first in the MRO, so every method that runs is
    shmpool's; torch's `__init__` is never called and its methods are never reached.
    """

    ring_size: int = DEFAULT_TORCH_RING_SIZE  # set by install(ring_size=...)

    def __init__(
        self,
        nprocs: int,
        pickler: Any = None,
        kind: Any = SubprocKind.FORK,
        quiesce: bool = False,
    ) -> None:
        # torch passes its own SubprocKind enum; the values are the same strings.
        shm_kind = SubprocKind(kind.value)
        # torch's base SubprocPickler is plain pickle, so it maps onto shmpool's default,
        # which adds the zero-copy path. A subclass of it may change the format, so it
        # is passed through unchanged.
        if pickler is not None and type(pickler) is _torch_compat.torch_base_pickler_class():
            pickler = None
        parent_pid, torch_key, env = _torch_compat.parent_worker_state()
        # Chosen and emptied once per pool, as torch opens it; every worker appends.
        self.log_path = _torch_compat.open_worker_log()
        SubprocPool.__init__(
            self,
            nprocs,
            pickler,
            shm_kind,
            quiesce,
            initializer=_torch_compat.init_worker,
            initargs=(parent_pid, torch_key, env, self.log_path),
            quiesce_after=_torch_compat.quiesce_after_seconds(),
            ring_size=self.ring_size,
            # The helper outlives quiesce(): a wakeup() forks from it, still warm.
            preload=_torch_compat.FORK_HELPER_PRELOAD,
        )


# install()/uninstall() swap module globals that other threads read while compiling;
# the lock keeps two installers from saving each other's class as "torch's".
_lock = threading.Lock()
_saved_globals: dict[str, type] | None = None


def install(
    *,
    ring_size: int = DEFAULT_TORCH_RING_SIZE,
    backend: str = "local",
    address: str | None = None,
    actor_options: dict[str, Any] | None = None,
) -> None:
    """Make inductor build shmpool pools from now on. Idempotent; never raises once imported
    (except ImportError for backend="ray" without the ray extra).

    `ring_size` applies to pools built from now on (see DEFAULT_TORCH_RING_SIZE).
    `backend="ray"` builds them as Ray pools instead (`shmpool._torch_remote`): FX and kernel
    compiles run on Ray actors at `address` (None: a local Ray; "auto" or "ray://..."), each
    built with `actor_options`, and what they write to their caches comes back to this one.
    """
    global _saved_globals
    if backend not in ("local", "ray"):
        raise ValueError(f"backend must be 'local' or 'ray', got {backend!r}")
    pool_class: type = TorchSubprocPool
    if backend == "ray":
        from shmpool import _torch_remote

        pool_class = _torch_remote.configure(address, actor_options)
    with _lock:
        TorchSubprocPool.ring_size = ring_size
        if _saved_globals is not None:
            if set(_torch_compat.pool_globals().values()) != {pool_class}:  # the other backend
                _torch_compat.set_pool_globals({name: pool_class for name in _saved_globals})
            return
        saved = _torch_compat.pool_globals()
        _torch_compat.set_pool_globals({name: pool_class for name in saved})
        _saved_globals = saved
        _torch_fx_wire.enable()  # FX jobs' tensor storages out of band (issue 11)


def uninstall() -> None:
    """Give inductor its own pool class back and shut our pools down. Idempotent."""
    global _saved_globals
    with _lock:
        if _saved_globals is None:
            return
        _torch_compat.set_pool_globals(_saved_globals)
        _saved_globals = None
        _torch_fx_wire.disable()


def is_installed() -> bool:
    return _saved_globals is not None


@contextmanager
def installed() -> Iterator[None]:
    """install() for the block; uninstall() after it unless it was installed before."""
    was_installed = is_installed()
    install()
    try:
        yield
    finally:
        if not was_installed:
            uninstall()


def fx_process_pool() -> Any:
    """The pool subprocess FX compiles use now: a TorchSubprocPool once installed."""
    return _torch_compat.fx_process_pool()


def async_compile_pool() -> Any:
    """The pool async kernel compiles use now (when worker_start_method is "subprocess")."""
    return _torch_compat.async_compile_pool()


@contextmanager
def subprocess_fx_compile() -> Iterator[None]:
    """Compile FX graphs in a worker for the block, like TORCHINDUCTOR_FX_COMPILE_MODE=subprocess.

    The environment variable only counts if set before torch._inductor is imported;
    this works at any time.
    """
    with _torch_compat.fx_compile_mode_subprocess():
        yield


def fx_compile_counts() -> dict[str, int]:
    """Graphs compiled so far by scheme: "_SubprocessFxCompile" went to a worker,
    "_InProcessFxCompile" fell back to the parent."""
    return _torch_compat.fx_compile_counts()


def clear_fx_compile_counts() -> None:
    _torch_compat.clear_fx_compile_counts()


def fx_wire_stats() -> _torch_fx_wire.FxWireStats:
    """What the FX jobs pickled since start carried: distinct storages (each sent once, out of
    band), the references to them, their bytes and the stream's. Copies: fx_process_pool().stats()."""
    return _torch_fx_wire.stats()


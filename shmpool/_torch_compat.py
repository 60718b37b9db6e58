"""Every use of torch's private names by shmpool, in one place.

torch has no public hook for choosing the pool that inductor compiles in, so the
glue in `shmpool.torch` has to reach into `torch._inductor`. Each function below
is the only place one private name is touched, and says why.

Supported: torch >=2.13,<2.15 (the torch extra's range). Run against 2.13.0 (tests/torch,
CI) and 2.14.1 (tests/torch through scripts/torch_next.sh): the names and signatures used
here are the same in both; 2.14.1 only adds an optional `close_fds` to
`_async_compile_initializer` and may send None values in the FX job's extra_env, neither of
which we depend on. `check_supported()` fails early, naming the missing piece and the
supported range, if another torch moves one of them.

What we rely on, read from torch 2.13.0's source:
- `torch/_inductor/compile_fx_subproc.py`: `_SubprocessFxCompile.process_pool()`,
  a `functools.cache`d staticmethod that builds `SubprocPool(1, kind=SPAWN)`
  from its module global `SubprocPool`.
- `torch/_inductor/async_compile.py`: `AsyncCompile.process_pool()`, an
  `lru_cache(1)` staticmethod that builds `SubprocPool(n, quiesce=...)` from its
  module global when `config.worker_start_method == "subprocess"`, adds it to
  `_pool_set`; `AsyncCompile.wakeup()` only wakes it if
  `isinstance(pool, SubprocPool)` against that same module global.
- `torch/_inductor/compile_worker/__main__.py`: the set-up torch's sidecar does once
  before it forks its workers (`prepare_fork_helper()` does it in our fork helper) and
  the set-up every worker ends up with (`init_worker()`).
- `torch/_inductor/compile_worker/subproc_pool.py`: `SubprocException(details, name)`,
  what inductor catches to re-raise with a kernel's name (`e.with_name(kernel_name)`);
  where workers' output goes (`config.worker_suppress_logging`,
  `config.torchinductor_worker_logpath`, `config.get_worker_log_path()`), which
  `worker_log_path()` repeats.
- `torch/_inductor/compile_fx.py`: `fx_compile_mode` (read on every compile),
  `FxCompile._compile_stats` (a count of compiles by scheme class).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

SUPPORTED_TORCH = ">=2.13,<2.15"  # the torch extra in pyproject.toml
CHECKED_TORCH_VERSIONS = ("2.13.0", "2.14.1")

# What the fork helper of a torch pool imports before it forks any worker: the module runs
# `prepare_fork_helper()` on import (preload= only takes module names).
FORK_HELPER_PRELOAD = ("shmpool._torch_preload",)

# The module globals named `SubprocPool` that torch builds its pools from and,
# in async_compile, tests `isinstance` against. Rebinding them is the whole patch.
_POOL_MODULES = ("torch._inductor.compile_fx_subproc", "torch._inductor.async_compile")

# Environment every torch compile worker sees; the rest of os.environ is inherited.
# TORCH_WARM_POOL=0: a worker importing inductor must never start a pool of its own
# (torch's sidecar sets it for the same reason). The cache dirs are the parent's, so
# what a worker compiles lands where the parent looks it up.
_PARENT_ENV_VARS = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "LD_LIBRARY_PATH")


def _import(name: str) -> Any:
    import importlib

    return importlib.import_module(name)


def check_supported() -> None:
    """Raise ImportError naming the first torch private we need that is missing."""
    needs = {
        "torch._inductor.compile_fx_subproc": ("SubprocPool", "_SubprocessFxCompile"),
        "torch._inductor.async_compile": ("SubprocPool", "AsyncCompile", "_pool_set", "pre_fork_setup"),
        "torch._inductor.compile_worker.subproc_pool": (
            "SubprocPool", "SubprocPickler", "SubprocKind", "SubprocException",
        ),
        "torch._inductor.compile_worker.utils": ("_async_compile_initializer",),
        "torch._inductor.runtime.compile_tasks": ("_set_triton_ptxas_path",),
        "torch._inductor.codecache": ("torch_key",),
        "torch._inductor.compile_fx": ("fx_compile_mode", "FxCompileMode", "FxCompile"),
        "torch._inductor.config": ("worker_suppress_logging", "torchinductor_worker_logpath", "get_worker_log_path"),
    }
    where = f"shmpool.torch supports torch {SUPPORTED_TORCH} (run: {', '.join(CHECKED_TORCH_VERSIONS)})"
    for module, names in needs.items():
        try:
            mod = _import(module)
        except ImportError as e:
            raise ImportError(
                f"shmpool.torch: torch {torch.__version__} has no {module}; {where}"
            ) from e
        for name in names:
            if not hasattr(mod, name):
                raise ImportError(
                    f"shmpool.torch: torch {torch.__version__} has no {module}.{name}; {where}"
                )


def torch_pool_class() -> type:
    """torch's own SubprocPool: the base our pool also derives from, for isinstance checks."""
    return _import("torch._inductor.compile_worker.subproc_pool").SubprocPool  # type: ignore[no-any-return]


def torch_subproc_exception_class() -> type:
    """torch's SubprocException: what inductor's async_compile catches around a kernel's future."""
    return _import("torch._inductor.compile_worker.subproc_pool").SubprocException  # type: ignore[no-any-return]


def torch_base_pickler_class() -> type:
    """torch's SubprocPickler: plain pickle at HIGHEST_PROTOCOL, the same as shmpool's default."""
    return _import("torch._inductor.compile_worker.subproc_pool").SubprocPickler  # type: ignore[no-any-return]


def quiesce_after_seconds() -> float:
    """How long torch lets an idle async-compile pool live before quiescing it."""
    from torch._inductor import config

    return float(config.quiesce_async_compile_time)


def pool_globals() -> dict[str, type]:
    """The current `SubprocPool` global of each module torch builds pools in."""
    return {name: _import(name).SubprocPool for name in _POOL_MODULES}


def set_pool_globals(classes: dict[str, type]) -> None:
    """Rebind `SubprocPool` in torch's pool-building modules, then drop their cached pools.

    Rebinding the module global (not torch's class) changes what torch builds and,
    in `AsyncCompile.wakeup()`, what it tests with isinstance, while leaving torch's
    own class untouched for anyone else using it. A pool that was already built is
    shut down and forgotten so the next call builds one from the new class; a pool
    of the class being installed is kept.
    """
    for name, cls in classes.items():
        _import(name).SubprocPool = cls
    wanted = tuple(classes.values())
    _reset_fx_pool(keep=wanted)
    _reset_async_pool(keep=wanted)


def _reset_fx_pool(keep: tuple[type, ...]) -> None:
    fx = _import("torch._inductor.compile_fx_subproc")._SubprocessFxCompile
    _drop_cached_pool(fx.process_pool, keep)


def _reset_async_pool(keep: tuple[type, ...]) -> None:
    ac = _import("torch._inductor.async_compile")
    pool = _drop_cached_pool(ac.AsyncCompile.process_pool, keep)
    if pool is not None:
        ac.AsyncCompile._ready_future = None
        ac._pool_set.discard(pool)


def _drop_cached_pool(cached: Any, keep: tuple[type, ...]) -> Any:
    """Shut down the pool a functools.cache'd factory holds, unless it is of a kept class, so
    the next call builds one of the class now installed. Returns the pool dropped, if any."""
    if cached.cache_info().currsize == 0:
        return None
    pool = cached()
    if type(pool) in keep:
        return None
    cached.cache_clear()
    pool.shutdown()
    return pool


def drop_pools() -> None:
    """Shut down and forget whatever pools torch has built; the next use builds new ones."""
    _reset_fx_pool(keep=())
    _reset_async_pool(keep=())


def fx_process_pool() -> Any:
    """The pool subprocess FX compiles go to (built on first call, as torch does)."""
    return _import("torch._inductor.compile_fx_subproc")._SubprocessFxCompile.process_pool()


def async_compile_pool() -> Any:
    """The pool AsyncCompile sends kernel compiles to (built on first call, as torch does)."""
    return _import("torch._inductor.async_compile").AsyncCompile.process_pool()


def cache_writing_jobs() -> dict[tuple[str, str], int]:
    """torch's compile jobs that write TORCHINDUCTOR_CACHE_DIR/TRITON_CACHE_DIR for the caller
    to load, as ``(module, qualname) -> index of their extra_env argument``: what a remote
    pool must ship back (see `shmpool._torch_remote`). From compile_fx_subproc.py and
    async_compile.py, which submits the last two from runtime/compile_tasks.py."""
    return {
        ("torch._inductor.compile_fx_subproc", "_SubprocessFxCompile._run_in_child_subprocess"): 1,
        ("torch._inductor.runtime.compile_tasks", "_worker_compile_triton"): 1,
        ("torch._inductor.runtime.compile_tasks", "_worker_compile_pycodecache_kernel"): 3,
    }


def async_compile_wakeup() -> None:
    """What inductor calls before compiling kernels: start the async pool's workers."""
    _import("torch._inductor.async_compile").AsyncCompile.wakeup()


def async_compile_wait_ready(timeout: float) -> None:
    """Submit torch's readiness no-op to the async pool and wait for it."""
    _import("torch._inductor.async_compile").AsyncCompile.wait_pool_ready(timeout=timeout)


@contextmanager
def fx_compile_mode_subprocess() -> Iterator[None]:
    """Make inductor compile FX graphs in a subprocess, as TORCHINDUCTOR_FX_COMPILE_MODE=subprocess does.

    The environment variable is read once, when compile_fx is imported; the
    module global it sets is read on every compile, so setting that works later too.
    """
    cfx = _import("torch._inductor.compile_fx")
    saved = cfx.fx_compile_mode
    cfx.fx_compile_mode = cfx.FxCompileMode.SUBPROCESS
    try:
        yield
    finally:
        cfx.fx_compile_mode = saved


def fx_compile_counts() -> dict[str, int]:
    """Graphs compiled so far in this process, by FX-compile scheme class name.

    `_SubprocessFxCompile` counts compiles that went to a worker; `_InProcessFxCompile`
    counts the ones that fell back to compiling in the parent (e.g. unpicklable graphs).
    """
    cfx = _import("torch._inductor.compile_fx")
    return {cls.__name__: stat.codegen_and_compile for cls, stat in cfx.FxCompile._compile_stats.items()}


def clear_fx_compile_counts() -> None:
    _import("torch._inductor.compile_fx").FxCompile._compile_stats.clear()


def worker_log_path() -> str | None:
    """Where torch sends its compile workers' stdout and stderr, decided as its SubprocPool does.

    `config.worker_suppress_logging` (on by default) wins: os.devnull. Else
    TORCHINDUCTOR_WORKER_LOGPATH (`config.torchinductor_worker_logpath`), else the
    deployment's own path (`config.get_worker_log_path()`, None outside Meta's cluster).
    None: the workers keep the parent's stdout and stderr.
    """
    from torch._inductor import config

    if config.worker_suppress_logging:
        return os.devnull
    return config.torchinductor_worker_logpath or config.get_worker_log_path() or None


def open_worker_log() -> str | None:
    """Pick the workers' log as torch does and start it empty, as torch opens it with "w" once
    per pool. Returns the path each worker appends to (see `init_worker`), or None."""
    path = worker_log_path()
    if path is not None and path != os.devnull:
        with open(path, "w"):
            pass
    return path


def parent_worker_state() -> tuple[int, bytes, dict[str, str | None]]:
    """What `init_worker` needs from the parent: its pid, its torch_key, the env to copy."""
    from torch._inductor.codecache import torch_key

    env: dict[str, str | None] = {name: os.environ.get(name) for name in _PARENT_ENV_VARS}
    env["TORCH_WARM_POOL"] = "0"
    return os.getpid(), torch_key(), env


def prepare_fork_helper() -> None:
    """In the fork helper, before its first fork: what torch's sidecar does before forking.

    compile_worker/__main__.py imports inductor (TORCH_WARM_POOL=0 in its environment), sets
    the ptxas path, preloads triton and runs `pre_fork_setup()` (device properties, the
    triton key, ~0.3 s of hashing here), all once; its workers are forks that inherit it
    all. Done here, every worker the helper forks starts with the same head start instead
    of importing inductor itself (8 workers on 2 cores: ~27 s to the first ready worker
    without it, torch's pool ~8 s). What is per worker (the parent's torch_key, the
    environment, the watchdog) stays in `init_worker`. Unlike torch's sidecar, the helper
    imports with the cyclic GC paused and freezes the result (see below).
    """
    import gc

    # Before inductor is imported: a helper must never start a compile pool of its own.
    os.environ["TORCH_WARM_POOL"] = "0"
    # What CPython's gc docs advise for a process that forks without exec: no cyclic
    # collections while importing (they re-walk the growing heap again and again: ~1 s of
    # the ~4 s these imports take here), then freeze what was imported, so neither the
    # helper nor a forked worker walks those objects again; a worker's collection would
    # write to every one of them and copy their pages. The few cycles the imports left
    # behind stay with them (a collection to free them would cost ~0.35 s).
    gc.disable()
    try:
        import torch._inductor.codecache  # noqa: F401
        import torch._inductor.compile_worker.utils  # noqa: F401
        from torch._inductor.async_compile import pre_fork_setup
        from torch._inductor.runtime.compile_tasks import _set_triton_ptxas_path

        _set_triton_ptxas_path()
        try:
            import triton  # noqa: F401
        except ImportError:
            pass
        pre_fork_setup()
    finally:
        gc.freeze()
        gc.enable()


def _redirect_output(path: str) -> None:
    """Point this process's fds 1 and 2 at `path`, appending, as torch's workers inherit
    its log file as their stdout and stderr. O_APPEND: workers writing at once interleave
    lines instead of overwriting each other."""
    import sys

    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    finally:
        os.close(fd)


def init_worker(
    parent_pid: int, parent_torch_key: bytes, env: dict[str, str | None], log_path: str | None = None
) -> None:
    """Set a pool worker up as torch's compile_worker/__main__.py sets up its own.

    Same steps, same order: output to torch's worker log, environment (it must be in place
    before inductor reads it on import), the ptxas path, triton preloaded,
    `pre_fork_setup()`, the parent's `torch_key`, then `_async_compile_initializer`, which
    marks the process as a worker, ignores SIGINT, installs torch's crash handler and starts
    the watchdog that kills the worker once its parent is gone. A worker forked from a
    helper that ran `prepare_fork_helper()` finds the imports and `pre_fork_setup()` done.
    """
    if log_path is not None:
        _redirect_output(log_path)
    # None means "unset in the parent": drop it here too, so a worker started by a
    # long-lived helper does not keep a stale cache dir.
    for name, value in env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value

    from torch._inductor.runtime.compile_tasks import _set_triton_ptxas_path

    _set_triton_ptxas_path()
    try:
        import triton  # noqa: F401  (preloaded as torch's worker does: the first compile should not pay for it)
    except ImportError:
        pass

    from torch._inductor.async_compile import pre_fork_setup
    from torch._inductor.codecache import torch_key
    from torch._inductor.compile_worker.utils import _async_compile_initializer

    pre_fork_setup()  # cached: free in a worker forked from a prepared helper
    # A forked worker may have inherited a computed key; the parent's wins, as in torch.
    torch_key.clear()  # type: ignore[attr-defined]
    torch_key.set(parent_torch_key)  # type: ignore[attr-defined]
    # The watchdog kills the worker when its parent pid changes. Our worker's parent
    # is the pool's process, or a fork helper between the two; watch whichever one
    # the kernel will reparent us away from.
    ppid = os.getppid()
    _async_compile_initializer(parent_pid if ppid == parent_pid else ppid)


def worker_probe() -> dict[str, Any]:
    """Runs in a worker: what init_worker set, for tests and for checking a deployment."""
    from torch._inductor.codecache import torch_key
    from torch._inductor.compile_worker.utils import in_toplevel_process

    return {
        "pid": os.getpid(),
        "torch_key": torch_key(),
        "in_toplevel_process": in_toplevel_process(),
        "env": {name: os.environ.get(name) for name in (*_PARENT_ENV_VARS, "TORCH_WARM_POOL", "TRITON_PTXAS_PATH")},
    }


# --- Subprocess FX jobs with their tensor storages out of band (issue 11) -------------------
#
# torch pickles a subprocess FX job with `GraphPickler.dumps` into one `bytes`, and every CPU
# storage in it through `TypedStorage.__reduce__`, which `torch.save`s it into bytes of its own:
# once per tensor object, so a frozen weight that is both a graph constant and a parameter of the
# module kept in the tracing context is saved twice. `shmpool._torch_fx_wire` pickles the same job
# with a GraphPickler subclass that turns each distinct storage into one out-of-band buffer
# instead. These functions are its only contact with torch's private names. Checked against torch
# 2.13.0 (run: tests/torch/test_frozen_weights.py); 2.14.1's compile_fx_ext.py and
# fx/_graph_pickler.py define the same names with the same signatures (source read, not run).


def fx_wire_classes() -> tuple[type, type, type] | None:
    """``(_WireProtocolInput, _WireProtocolPickledInput, GraphPickler)``, or None when this torch
    lacks one of them (shmpool then leaves torch's own pickling of FX jobs alone)."""
    try:
        ext = _import("torch._inductor.compile_fx_ext")
        gp = _import("torch.fx._graph_pickler")
        classes = (ext._WireProtocolInput, ext._WireProtocolPickledInput, gp.GraphPickler)
    except (ImportError, AttributeError):
        return None
    if not all(hasattr(c, m) for c, m in zip(classes, ("serialize", "deserialize", "reducer_override"))):
        return None
    if not hasattr(gp, "patch_pytree_map_over_slice"):
        return None
    return classes


def graph_pickler_dump(pickler_cls: type, obj: object, file: Any) -> Any:
    """Pickle ``obj`` into ``file`` with ``pickler_cls`` (a GraphPickler subclass) the way
    ``GraphPickler.dumps`` does, and return the pickler, which holds what it collected."""
    gp = _import("torch.fx._graph_pickler")
    with gp.patch_pytree_map_over_slice():
        pickler = pickler_cls(file)
        pickler.dump(obj)
    return pickler


_torch_fx_input_serialize: Any = None  # torch's own, while ours is in place


def set_fx_input_serializer(serialize: Any) -> None:
    """Make ``_WireProtocolInput.serialize`` (what ``_SerializedFxCompile.serialize_compile``
    calls to pickle an FX job) ``serialize``; None gives torch's own back. Idempotent.

    Patched on torch's class because serialize_compile builds the input and pickles it in one
    method: the pool is only ever handed the finished bytes."""
    global _torch_fx_input_serialize
    cls = _import("torch._inductor.compile_fx_ext")._WireProtocolInput
    if serialize is None:
        if _torch_fx_input_serialize is not None:
            cls.serialize = _torch_fx_input_serialize
            _torch_fx_input_serialize = None
        return
    if _torch_fx_input_serialize is None:
        _torch_fx_input_serialize = cls.__dict__["serialize"]
    cls.serialize = serialize


@contextmanager
def fx_process_pool_as(pool: Any) -> Iterator[None]:
    """Send subprocess FX compiles to ``pool`` (anything with ``submit(fn, *args) -> Future``) for
    the block, instead of the pool ``_SubprocessFxCompile.process_pool()`` builds: for the
    benchmark, which compiles through each pool it compares."""
    fx = _import("torch._inductor.compile_fx_subproc")._SubprocessFxCompile
    saved = fx.__dict__["process_pool"]
    fx.process_pool = staticmethod(lambda: pool)
    try:
        yield
    finally:
        fx.process_pool = saved

"""Every use of torch's private names by shmpool, in one place.

torch has no public hook for choosing the pool that inductor compiles in, so the
glue in `shmpool.torch` has to reach into `torch._inductor`. Each function below
is the only place one private name is touched, and says why.

Checked against torch 2.13.0 (run: tests/torch) and 2.14.1 (source read and
diffed from a throwaway venv, not run): the names and signatures used here are the
same in both; 2.14.1 only adds an optional `close_fds` to `_async_compile_initializer`
and may send None values in the FX job's extra_env, neither of which we depend on. `check_supported()` fails early, naming the missing piece, if a later
torch moves one of them.

What we rely on, read from torch 2.13.0's source:
- `torch/_inductor/compile_fx_subproc.py`: `_SubprocessFxCompile.process_pool()`,
  a `functools.cache`d staticmethod that builds `SubprocPool(1, kind=SPAWN)`
  from its module global `SubprocPool`.
- `torch/_inductor/async_compile.py`: `AsyncCompile.process_pool()`, an
  `lru_cache(1)` staticmethod that builds `SubprocPool(n, quiesce=...)` from its
  module global when `config.worker_start_method == "subprocess"`, adds it to
  `_pool_set`; `AsyncCompile.wakeup()` only wakes it if
  `isinstance(pool, SubprocPool)` against that same module global.
- `torch/_inductor/compile_worker/__main__.py`: the set-up every torch compile
  worker gets, which `init_worker()` repeats.
- `torch/_inductor/compile_fx.py`: `fx_compile_mode` (read on every compile),
  `FxCompile._compile_stats` (a count of compiles by scheme class).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

CHECKED_TORCH_VERSIONS = ("2.13.0", "2.14.1")

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
        "torch._inductor.compile_worker.subproc_pool": ("SubprocPool", "SubprocPickler", "SubprocKind"),
        "torch._inductor.compile_worker.utils": ("_async_compile_initializer",),
        "torch._inductor.runtime.compile_tasks": ("_set_triton_ptxas_path",),
        "torch._inductor.codecache": ("torch_key",),
        "torch._inductor.compile_fx": ("fx_compile_mode", "FxCompileMode", "FxCompile"),
    }
    for module, names in needs.items():
        try:
            mod = _import(module)
        except ImportError as e:
            raise ImportError(
                f"shmpool.torch: torch {torch.__version__} has no {module} "
                f"(checked versions: {', '.join(CHECKED_TORCH_VERSIONS)})"
            ) from e
        for name in names:
            if not hasattr(mod, name):
                raise ImportError(
                    f"shmpool.torch: torch {torch.__version__} has no {module}.{name} "
                    f"(checked versions: {', '.join(CHECKED_TORCH_VERSIONS)})"
                )


def torch_pool_class() -> type:
    """torch's own SubprocPool: the base our pool also derives from, for isinstance checks."""
    return _import("torch._inductor.compile_worker.subproc_pool").SubprocPool  # type: ignore[no-any-return]


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


def parent_worker_state() -> tuple[int, bytes, dict[str, str | None]]:
    """What `init_worker` needs from the parent: its pid, its torch_key, the env to copy."""
    from torch._inductor.codecache import torch_key

    env: dict[str, str | None] = {name: os.environ.get(name) for name in _PARENT_ENV_VARS}
    env["TORCH_WARM_POOL"] = "0"
    return os.getpid(), torch_key(), env


def init_worker(parent_pid: int, parent_torch_key: bytes, env: dict[str, str | None]) -> None:
    """Set a pool worker up as torch's compile_worker/__main__.py sets up its own.

    Same steps, same order: environment first (it must be in place before inductor
    reads it on import), the ptxas path, triton preloaded, `pre_fork_setup()`, the
    parent's `torch_key`, then `_async_compile_initializer`, which marks the process
    as a worker, ignores SIGINT, installs torch's crash handler and starts the
    watchdog that kills the worker once its parent is gone.
    """
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

    pre_fork_setup()
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

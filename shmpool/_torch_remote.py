"""torch.compile's worker pools on Ray, and the compile artifacts they ship back.

A remote worker does not share the caller's disk, and a compile job writes files the caller
later loads. What torch 2.13.0 writes and reads, from its source:

- Subprocess FX compile (``compile_fx_subproc._SubprocessFxCompile``): the job is
  ``_run_in_child_subprocess(pickled_input, extra_env)``, ``extra_env`` being the caller's
  ``TORCHINDUCTOR_CACHE_DIR``/``TRITON_CACHE_DIR``. It answers a ``_WireProtocolPickledOutput``
  whose ``CompiledFxGraph`` carries its output code as ``source_code`` but not what that code
  loads (``prepare_for_serialization`` drops the callables). The caller's
  ``after_deserialization`` writes ``source_code`` to ``<cache>/<key[1:3]>/<key>.py`` and
  imports it; importing runs ``async_compile.cpp_pybinding(...)`` for each C++ kernel, which
  looks up ``<cache>/<k[1:3]>/<k>.so`` (its key hashes the kernel source and the compile
  command, not the cache path) and builds it only when missing (``_worker_compile_cpp``), and
  ``async_compile.triton(...)`` for each Triton kernel, which finds its binaries under
  ``TRITON_CACHE_DIR``. So without the worker's files the caller would silently compile every
  kernel again itself.
- Async kernel compile (``async_compile``): ``_worker_compile_triton(load_kernel, extra_env,
  extra_config)`` fills the Triton cache the caller's ``precompile`` reads back;
  ``_worker_compile_pycodecache_kernel(..., extra_env, ...)`` returns a path in the cache.

So every job that carries such an ``extra_env`` runs here in a fresh per-job cache directory
on the worker (``<worker cache>/shmpool-jobs/<id>/{inductor,triton}``, both variables pointed
at it); everything the job wrote there (lock files aside) comes back with its result, is
written into the caller's caches under the same relative paths before the caller's future
resolves, and paths to it in the result are rewritten to the caller's. The per-job directory
also means a worker-side cache hit can never leave the caller without a file.

Worker set-up is torch's (``_torch_compat.init_worker``) minus what is host-local: the
caller's cache directories and ``LD_LIBRARY_PATH`` stay on the caller; each actor gets cache
directories of its own (``SHMPOOL_REMOTE_CACHE_BASE`` or the temp dir, then ``worker-<pid>-*``).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any, ClassVar

from shmpool import SubprocKind, _torch_compat
from shmpool.ray import RayPool

CACHE_VARS = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
_HOST_LOCAL_VARS = (*CACHE_VARS, "LD_LIBRARY_PATH")  # meaningless on another machine
_ROOT_OF = {"TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton"}
CACHE_BASE_VAR = "SHMPOOL_REMOTE_CACHE_BASE"

_counts_lock = threading.Lock()
_counts = {"jobs": 0, "files": 0, "bytes": 0}


def shipped_counts() -> dict[str, int]:
    """Jobs whose artifacts came back, and the files and bytes written into the caller's caches."""
    with _counts_lock:
        return dict(_counts)


# ---------------------------------------------------------------- worker side

def init_remote_worker(parent_torch_key: bytes, env: dict[str, str | None]) -> None:
    """Set up an actor as torch sets up its compile workers, with cache dirs of its own."""
    base = os.environ.get(CACHE_BASE_VAR) or os.path.join(tempfile.gettempdir(), "shmpool-remote")
    os.makedirs(base, exist_ok=True)
    own = tempfile.mkdtemp(prefix=f"worker-{os.getpid()}-", dir=base)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(own, "inductor")
    os.environ["TRITON_CACHE_DIR"] = os.path.join(own, "triton")
    # parent_pid -1: never the actor's parent, so torch's watchdog watches the raylet, which
    # is what this process dies with.
    _torch_compat.init_worker(-1, parent_torch_key, env)


def run_shipping_caches(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], env_index: int) -> tuple[Any, list[tuple[str, str, bytes, int]], dict[str, str]]:
    """Run a compile job in a fresh per-job cache; return its result, the files it wrote as
    ``(root, relative path, bytes, mode)`` and the job's roots (to rewrite paths)."""
    worker_cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or tempfile.gettempdir()
    os.makedirs(os.path.join(worker_cache, "shmpool-jobs"), exist_ok=True)
    job_dir = tempfile.mkdtemp(prefix="job-", dir=os.path.join(worker_cache, "shmpool-jobs"))
    roots = {name: os.path.join(job_dir, name) for name in ("inductor", "triton")}
    env = dict(args[env_index] or {})
    env["TORCHINDUCTOR_CACHE_DIR"], env["TRITON_CACHE_DIR"] = roots["inductor"], roots["triton"]
    args = (*args[:env_index], env, *args[env_index + 1 :])
    saved = {name: os.environ.get(name) for name in CACHE_VARS}
    try:
        os.environ.update({name: env[name] for name in CACHE_VARS})  # jobs that read os.environ directly
        result = fn(*args, **kwargs)
        files = _collect(roots)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(job_dir, ignore_errors=True)
    return result, files, roots


def _collect(roots: Mapping[str, str]) -> list[tuple[str, str, bytes, int]]:
    files = []
    for name, root in roots.items():
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d != "locks"]
            for fname in filenames:
                if fname.endswith(".lock") or ".tmp" in fname:
                    continue  # lock files and half-written temporaries are nobody's output
                path = os.path.join(dirpath, fname)
                with open(path, "rb") as f:
                    data = f.read()
                files.append((name, os.path.relpath(path, root), data, os.stat(path).st_mode & 0o777))
    return files


# ---------------------------------------------------------------- caller side

def _caller_roots(caller_env: Mapping[str, str]) -> dict[str, str]:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    inductor = caller_env.get("TORCHINDUCTOR_CACHE_DIR") or cache_dir()
    triton = caller_env.get("TRITON_CACHE_DIR") or os.environ.get("TRITON_CACHE_DIR")
    if not triton:
        try:
            from triton import knobs

            triton = knobs.cache.dir
        except (ImportError, AttributeError):
            triton = os.path.join(os.path.expanduser("~"), ".triton", "cache")
    return {"inductor": inductor, "triton": triton}


def materialize(files: list[tuple[str, str, bytes, int]], caller_env: Mapping[str, str]) -> dict[str, str]:
    """Write shipped files into the caller's caches (never over an existing file); returns the roots."""
    roots = _caller_roots(caller_env)
    written = nbytes = 0
    for name, rel, data, mode in files:
        if os.path.isabs(rel) or rel.split(os.sep)[0] == ".." or name not in roots:
            raise ValueError(f"refusing to write shipped artifact {name}:{rel!r} outside the cache")
        dest = os.path.join(roots[name], rel)
        if os.path.exists(dest):
            continue
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        tmp = f"{dest}.shmpool-{os.getpid()}-{threading.get_ident()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, dest)  # atomic: a concurrent loader sees all of it or nothing
        written += 1
        nbytes += len(data)
    with _counts_lock:
        _counts["jobs"] += 1
        _counts["files"] += written
        _counts["bytes"] += nbytes
    return roots


def _rewrite_paths(value: Any, worker_roots: Mapping[str, str], caller_roots: Mapping[str, str]) -> Any:
    """A result's paths into the worker's job cache, pointed at the caller's (tuples, lists, str)."""
    if isinstance(value, str):
        for name, root in worker_roots.items():
            if value == root or value.startswith(root + os.sep):
                return caller_roots[name] + value[len(root) :]
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_rewrite_paths(v, worker_roots, caller_roots) for v in value)
    return value


def _cache_env_index(fn: Any, args: tuple[Any, ...]) -> int | None:
    """Where a job carries torch's cache ``extra_env``, if it is a compile job that writes the
    caches: one of torch's known jobs (whose ``extra_env`` is empty when the caller set neither
    variable), or any job passing a mapping that names a cache dir."""
    known = _torch_compat.cache_writing_jobs().get((getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)))
    if known is not None and known < len(args):
        return known
    for i, arg in enumerate(args):
        if isinstance(arg, Mapping) and any(name in arg for name in CACHE_VARS):
            return i
    return None


class TorchRayPool(RayPool, _torch_compat.torch_pool_class()):  # type: ignore[misc]
    """A RayPool inductor can build (torch's constructor) and recognise (``isinstance``).

    Jobs that carry torch's cache ``extra_env`` run through ``run_shipping_caches``; their
    artifacts are in the caller's caches before the future torch waits on resolves.
    """

    address: ClassVar[str | None] = None  # set by install(backend="ray", address=...)
    actor_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, nprocs: int, pickler: Any = None, kind: Any = SubprocKind.FORK, quiesce: bool = False) -> None:
        from shmpool.torch import TorchSubprocPool

        if pickler is not None and type(pickler) is _torch_compat.torch_base_pickler_class():
            pickler = None
        _, torch_key, env = _torch_compat.parent_worker_state()
        env = {k: v for k, v in env.items() if k not in _HOST_LOCAL_VARS}
        self.remote_error_class = TorchSubprocPool.remote_error_class
        RayPool.__init__(
            self,
            nprocs,
            pickler,
            kind,
            quiesce,
            initializer=init_remote_worker,
            initargs=(torch_key, env),
            quiesce_after=_torch_compat.quiesce_after_seconds(),
            address=self.address,
            actor_options=self.actor_options or None,
        )

    def submit(self, job_fn: Any, *args: Any, **kwargs: Any) -> Future:
        env_index = _cache_env_index(job_fn, args)
        if env_index is None:
            return RayPool.submit(self, job_fn, *args, **kwargs)
        caller_env = dict(args[env_index] or {})
        inner = RayPool.submit(self, run_shipping_caches, job_fn, args, kwargs, env_index)
        outer: Future = Future()

        def land(f: Future) -> None:
            try:
                result, files, worker_roots = f.result()
                caller_roots = materialize(files, caller_env)
                value, exc = _rewrite_paths(result, worker_roots, caller_roots), None
            except BaseException as e:  # the job's own error, or one writing its files
                value, exc = None, e
            if outer.set_running_or_notify_cancel():
                if exc is None:
                    outer.set_result(value)
                else:
                    outer.set_exception(exc)

        inner.add_done_callback(land)
        return outer


def configure(address: str | None, actor_options: Mapping[str, Any] | None) -> type[TorchRayPool]:
    """Set where pools built from now on run; returns the class to install."""
    TorchRayPool.address = address
    TorchRayPool.actor_options = dict(actor_options or {})
    return TorchRayPool

"""The pools under test, behind one small face: ``submit(fn, *args) -> Future``.

Every pool is wrapped in a :class:`PoolUnderTest` that knows how to start it, warm it, read
its counters (shmpool only), and tear it down within a deadline even when it is wedged, so a
peer that breaks (``BrokenProcessPool`` at 512 MiB, a hung ``multiprocessing.Pool`` after a
worker died) is recorded and rebuilt instead of stopping the run.

Teardown kills leftovers by pid: the processes that appeared under this process while the
pool started (sampled with psutil before and after), never a name pattern.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import threading
import time
from typing import Any, Callable

from shmpool.bench import jobs

# Pool names in the order tables list them. The first available of BASELINES is what
# ratios are taken against.
ALL_POOLS = ("shmpool-spawn", "shmpool-fork", "torch-spawn", "ppe-spawn", "mp-pool-spawn")
BASELINES = ("torch-spawn", "ppe-spawn")
# Run only when asked for (--pools): shmpool.ray's RayPool on a local Ray started for the run
# (ray.init takes ~6 s on 2 cores), to show what the remote path costs against the local one.
OPTIONAL_POOLS = ("shmpool-ray",)
KNOWN_POOLS = ALL_POOLS + OPTIONAL_POOLS

# torch's pool spawns a sidecar that imports torch before its workers start: ~9 s on 2 busy cores.
START_TIMEOUT_S = 180.0
# A graceful shutdown that takes longer than this is treated as wedged; leftovers are killed.
SHUTDOWN_TIMEOUT_S = 15.0
# Warm-up jobs hold their worker this long so a burst of them reaches every worker.
WARM_HOLD_S = 0.05


class PoolUnavailable(RuntimeError):
    """The pool cannot be built here (its library is missing); the run goes on without it."""


def _children() -> set[int]:
    import psutil  # the bench extra; cli checks for it before any pool starts

    try:
        procs = psutil.Process().children(recursive=True)
    except psutil.Error:
        return set()
    out = set()
    for p in procs:
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        # multiprocessing's resource tracker is shared by every spawn context of this
        # process; it belongs to no single pool and must outlive their restarts.
        if "resource_tracker" in cmd:
            continue
        out.add(p.pid)
    return out


def ensure_importable_by_workers() -> None:
    """Put the directory holding ``shmpool`` on PYTHONPATH for spawned interpreters.

    torch's pool starts its sidecar with ``python -m`` and a fresh ``sys.path``; without this
    a source checkout that is not pip-installed could not unpickle ``shmpool.bench.jobs.echo``.
    """
    import shmpool

    # __path__, not __file__: it works for a namespace package too (a checkout mid-build)
    root = os.path.dirname(os.path.abspath(list(shmpool.__path__)[0]))
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *parts])


def _make_shmpool(kind: str, workers: int):
    try:
        import shmpool
        pool_cls = shmpool.SubprocPool
        kinds = shmpool.SubprocKind
    except (ImportError, AttributeError) as e:
        raise PoolUnavailable(f"shmpool core not importable ({e})") from e
    return pool_cls(workers, kind=kinds(kind))


def _connect_ray(workers: int) -> None:
    """Start (or join) this process's Ray before the pool is timed: the cluster is not the pool."""
    try:
        import shmpool.ray
    except ImportError as e:
        raise PoolUnavailable(f"{e}") from e
    shmpool.ray.connect(num_cpus=max(workers, os.cpu_count() or 1), log_to_driver=False)


def _make_ray(workers: int):
    from shmpool.ray import RayPool

    return RayPool(workers)


def _make_torch(workers: int):
    try:
        from torch._inductor.compile_worker.subproc_pool import SubprocKind, SubprocPool
    except ImportError as e:
        raise PoolUnavailable(f"torch not installed ({e})") from e
    return SubprocPool(workers, kind=SubprocKind.SPAWN)


def _make_ppe(workers: int):
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def _make_mp_pool(workers: int):
    return multiprocessing.get_context("spawn").Pool(workers)


def _submit_mp_pool(pool, fn, *args) -> concurrent.futures.Future:
    """``multiprocessing.Pool`` as a Future, so every pool is timed through the same calls."""
    fut: concurrent.futures.Future = concurrent.futures.Future()
    fut.set_running_or_notify_cancel()
    pool.apply_async(fn, args, callback=fut.set_result, error_callback=fut.set_exception)
    return fut


def _shutdown_default(pool) -> None:
    pool.shutdown()


def _shutdown_ppe(pool) -> None:
    pool.shutdown(wait=True, cancel_futures=True)


def _shutdown_mp_pool(pool) -> None:
    pool.terminate()
    pool.join()


@dataclasses.dataclass
class PoolUnderTest:
    """One pool of one kind, started lazily, rebuilt after a failure."""

    name: str
    workers: int
    pool: Any = None
    startup_s: float | None = None
    restarts: int = 0
    owned_pids: set[int] = dataclasses.field(default_factory=set)
    unavailable: str | None = None

    # ------------------------------------------------------------------ life cycle
    def _factory(self) -> tuple[Callable[[], Any], Callable[[Any], None]]:
        n = self.workers
        if self.name == "shmpool-spawn":
            return (lambda: _make_shmpool("spawn", n)), _shutdown_default
        if self.name == "shmpool-fork":
            return (lambda: _make_shmpool("fork", n)), _shutdown_default
        if self.name == "torch-spawn":
            return (lambda: _make_torch(n)), _shutdown_default
        if self.name == "shmpool-ray":
            return (lambda: _make_ray(n)), _shutdown_default
        if self.name == "ppe-spawn":
            return (lambda: _make_ppe(n)), _shutdown_ppe
        if self.name == "mp-pool-spawn":
            return (lambda: _make_mp_pool(n)), _shutdown_mp_pool
        raise ValueError(f"unknown pool {self.name!r}; choose from {', '.join(KNOWN_POOLS)}")

    def start(self) -> None:
        """Build the pool and run one warm-up job on every worker; records ``startup_s``.

        Raises PoolUnavailable when the library is missing (and remembers it).
        """
        make, _ = self._factory()
        if self.name == "shmpool-ray":
            try:
                _connect_ray(self.workers)
            except PoolUnavailable as e:
                self.unavailable = str(e)
                raise
        before = _children()
        t0 = time.perf_counter()
        try:
            self.pool = make()
        except PoolUnavailable as e:
            self.unavailable = str(e)
            raise
        try:
            self.warm(())
        except BaseException:
            self.owned_pids |= _children() - before
            self.close()
            raise
        self.startup_s = time.perf_counter() - t0
        # Ray's raylet starts the actors (and spare workers of its own): shutdown() kills the
        # pool's actors through Ray; killing Ray's processes by pid would break Ray instead.
        self.owned_pids = set() if self.name == "shmpool-ray" else _children() - before

    def warm(self, modules: tuple[str, ...], timeout: float = START_TIMEOUT_S) -> None:
        """Import ``modules`` in every worker (best effort: jobs go where the pool sends them)."""
        futs = [self.submit(jobs.warm_import, modules, WARM_HOLD_S) for _ in range(2 * self.workers)]
        deadline = time.monotonic() + timeout
        for f in futs:
            f.result(timeout=max(0.0, deadline - time.monotonic()))

    def submit(self, fn, *args) -> concurrent.futures.Future:
        if self.name == "mp-pool-spawn":
            return _submit_mp_pool(self.pool, fn, *args)
        return self.pool.submit(fn, *args)

    def stats(self) -> dict | None:
        """shmpool's counters as a dict; None for pools that keep none."""
        if not self.name.startswith("shmpool") or self.pool is None:
            return None
        return dataclasses.asdict(self.pool.stats())

    def close(self) -> None:
        """Shut down within SHUTDOWN_TIMEOUT_S, then kill whatever it left. Never raises."""
        pool, self.pool = self.pool, None
        if pool is not None:
            _, shutdown = self._factory()
            th = threading.Thread(target=_quietly, args=(shutdown, pool), daemon=True)
            th.start()
            th.join(SHUTDOWN_TIMEOUT_S)
        import psutil

        for pid in sorted(self.owned_pids):
            try:
                p = psutil.Process(pid)
                p.kill()
                p.wait(timeout=5)
            except (psutil.Error, psutil.TimeoutExpired):
                pass
        self.owned_pids = set()

    def restart(self) -> None:
        """After a failure: tear down (bounded) and build afresh."""
        self.close()
        self.restarts += 1
        self.start()


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:  # a wedged or broken pool may fail its own shutdown; we kill leftovers next
        pass

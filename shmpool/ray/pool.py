"""RayPool: shmpool's pool front end over Ray actors.

Where the bytes go (one job, N bytes each way)::

  caller thread                  manager thread                    Ray actor (any node)
  -------------                  --------------                    --------------------
  submit(fn, *a)
    pickle -> Parts (no copy)
    to_wire: big pieces as
      PickleBuffers
    ray.put: COPY 1 (into the
      node's object store)  --queue-->  pick an idle actor
                                        actor.run.remote(ref) ----->  Ray maps the object (same
                                                                       node: 0 copies; else Ray's
                                                                       transfer first)
                                                                     unpickle from the mapping:
                                                                       in-band bytes: COPY 2
                                                                       numpy / PickleBuffer: 0
                                                                     run fn; pickle the result
                                                                     return it: Ray stores it, COPY 3
                                        ObjectRef.future() <-------
                                        unpickle: COPY 4 (buffers copied
                                          out, so nothing pins the store)
  future.result()  <--set_result--

Payloads under INLINE_LIMIT go by value in the task spec, as Ray would inline them anyway.

Threads: callers pickle and put outside any lock, then queue the job and wake the manager. The
manager thread owns every actor: it waits on one queue that Ray's completion callbacks and the
callers post to (with a timeout only while a deadline is pending), then acts: it places queued
jobs on idle actors, turns replies into results, replaces actors that died, timed out or were
recycled, and quiesces. Futures are resolved outside the lock, so done-callbacks may call back in.
"""
from __future__ import annotations

import atexit
import collections
import dataclasses
import enum
import itertools
import logging
import os
import pickle
import queue
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError

from ..arguments import checked_callable, checked_count, checked_env, checked_seconds, dump_submitted
from ..futures import JobFuture, settle
from ..errors import (
    JobTimeoutError,
    SubprocException,
    WorkerDiedError,
    WorkerStartError,
    describe_job,
    remote_error,
)
from ..pickler import SubprocPickler, has_zero_copy
from ..pool import PoolStats
from . import actor as _actor
from .payload import from_wire, to_wire

log = logging.getLogger(__name__)

# Ray inlines task arguments under 100 KiB in the task spec (max_direct_call_object_size); at
# or over this we put the payload in the object store ourselves, so we know it is there once.
INLINE_LIMIT = 100 << 10
MAX_START_FAILURES = 3  # consecutive actors dying before they are ready: fail the queue
# Seconds an actor may take from creation to the end of its set-up (scheduling, a runtime_env
# built, the initializer) before it counts as a failed start. Ray waits forever for resources
# no node offers; past this the caller hears why instead. Generous: a cluster may autoscale.
DEFAULT_START_TIMEOUT = 300.0
JOIN_LIMIT = 30.0  # seconds shutdown(wait=True) waits for the manager's teardown
# Each worker asks Ray for this much CPU unless actor_options says otherwise: one core per
# worker, as the local pool's processes take, and what spreads a pool over a cluster's nodes.
DEFAULT_ACTOR_OPTIONS: dict[str, Any] = {"num_cpus": 1}
_PLAIN = SubprocPickler()


def connect(address: str | None = None, num_cpus: int | None = None, **init_kwargs: Any) -> None:
    """Join Ray unless this process already has: ``address=None`` starts a local Ray with
    ``num_cpus`` (default: every core) and no dashboard; ``"auto"`` or ``"ray://host:port"``
    joins a cluster. Never shuts Ray down: other code in this process may be using it."""
    if ray.is_initialized():
        return
    if address is None:
        init_kwargs.setdefault("include_dashboard", False)
        ray.init(num_cpus=num_cpus or os.cpu_count(), **init_kwargs)
    else:
        ray.init(address=address, **init_kwargs)


class _State(enum.Enum):
    STARTING = "starting"  # created, setup() not answered yet
    IDLE = "idle"
    BUSY = "busy"  # running exactly one job
    GONE = "gone"  # killed or dead; whatever it answers later is ignored


# The only transitions there are; _move() refuses any other.
_ALLOWED = {
    _State.STARTING: {_State.IDLE, _State.GONE},
    _State.IDLE: {_State.BUSY, _State.GONE},
    _State.BUSY: {_State.IDLE, _State.GONE},
    _State.GONE: set(),
}


class _Job:
    __slots__ = ("job_id", "future", "arg", "size", "oob", "timeout", "deadline", "desc", "started")

    def __init__(self, job_id: int, future: Future, arg: Any, size: int, oob: int, timeout: float | None, desc: str) -> None:
        self.job_id = job_id
        self.future = future
        self.arg = arg  # an ObjectRef (put by us) or a small Wire; dropped once the job is done
        self.size = size
        self.oob = oob
        self.timeout = timeout
        self.deadline: float | None = None
        self.desc = desc
        self.started = False


class _Actor:
    __slots__ = ("serial", "handle", "state", "pid", "host", "job", "start_deadline")

    def __init__(self, serial: int, handle: Any, start_deadline: float) -> None:
        self.serial = serial
        self.handle = handle
        self.start_deadline = start_deadline
        self.state = _State.STARTING
        self.pid: int | None = None
        self.host: str | None = None
        self.job: _Job | None = None


def _move(w: _Actor, new: _State) -> None:
    if new not in _ALLOWED[w.state]:
        raise AssertionError(f"actor {w.serial}: {w.state.value} -> {new.value} is not a transition")
    w.state = new




def _ray_reason(e: BaseException) -> str:
    """The line of a Ray actor error that says why, for our own message."""
    text = str(e)
    for marker in ("Worker exit detail:", "The actor is dead because"):
        i = text.find(marker)
        if i >= 0:
            return text[i:].split(". ")[0].strip()
    return text.splitlines()[0] if text else type(e).__name__


_live_pools: "weakref.WeakSet[RayPool]" = weakref.WeakSet()
_atexit_registered = False


def _shutdown_all() -> None:
    for pool in list(_live_pools):
        pool.shutdown()


class RayPool:
    """shmpool's ``SubprocPool`` API whose workers are Ray actors.

    Same constructor as the local pool (``kind``, ``ring_size`` and ``preload`` are accepted
    and ignored: Ray starts the processes and owns the memory), plus ``address`` (None: a
    local Ray; "auto" or "ray://...": a cluster), ``num_cpus`` (of a local Ray) and
    ``actor_options`` (passed to ``.options()`` of every actor: resources, scheduling
    strategy, ``runtime_env``) and ``start_timeout`` (seconds an actor may take to be
    scheduled and set up before it counts as a failed start). ``initializer(*initargs)`` runs once per actor, also in every
    replacement; ``env`` is set in each actor's ``os.environ`` before it.
    """

    remote_error_class: Callable[[str, str], SubprocException] = staticmethod(remote_error)

    def __init__(
        self,
        nprocs: int,
        pickler: SubprocPickler | None = None,
        kind: Any = None,
        quiesce: bool = False,
        *,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        env: Mapping[str, str] | None = None,
        quiesce_after: float = 60.0,
        job_timeout: float | None = None,
        max_payload: int | None = None,
        worker_memory_cap: int | None = None,
        ring_size: int | None = None,
        preload: tuple[str, ...] = (),
        address: str | None = None,
        num_cpus: int | None = None,
        actor_options: Mapping[str, Any] | None = None,
        start_timeout: float = DEFAULT_START_TIMEOUT,
    ) -> None:
        global _atexit_registered
        nprocs = checked_count("nprocs", nprocs, 1)  # type: ignore[assignment]
        max_payload = checked_count("max_payload", max_payload, 1, " bytes", optional=True)
        worker_memory_cap = checked_count("worker_memory_cap", worker_memory_cap, 1, " bytes", optional=True)
        checked_callable("initializer", initializer, optional=True)
        job_timeout = checked_seconds("job_timeout", job_timeout)
        quiesce_after = checked_seconds("quiesce_after", quiesce_after)  # type: ignore[assignment]
        self.nprocs = nprocs
        self.pickler = pickler or SubprocPickler()
        self.kind = kind
        self._auto_quiesce = quiesce
        self._quiesce_after = quiesce_after
        self._job_timeout = job_timeout
        self._max_payload = max_payload
        self._start_timeout = start_timeout
        # Pickled once here, so a pickler or initializer that cannot travel fails now, loudly.
        self._boot = {
            "pickler": pickle.dumps(self.pickler, pickle.HIGHEST_PROTOCOL),
            "initializer": None if initializer is None else self.pickler.dumps((initializer, tuple(initargs))),
            "environ": checked_env(env),
            "max_payload": max_payload,
            "memory_cap": worker_memory_cap,
            "sys_path": list(sys.path),
        }
        self._zero_copy = has_zero_copy(self.pickler)
        connect(address, num_cpus)
        if not _atexit_registered:
            # Registered after ray.init, so it runs before Ray's own exit hook: actors are
            # killed and futures resolved while Ray still answers.
            atexit.register(_shutdown_all)
            _atexit_registered = True
        options = dict(DEFAULT_ACTOR_OPTIONS)
        options.update(actor_options or {})
        options.setdefault("max_restarts", 0)  # a dead actor is replaced by us, which knows its job
        self._actor_class = ray.remote(_actor.Worker).options(**options)
        self._actor_options_text = ", ".join(f"{k}={v!r}" for k, v in options.items() if k != "runtime_env")

        self._lock = threading.Lock()
        self._pending: collections.deque[_Job] = collections.deque()  # guarded by _lock
        self._closing = False  # guarded by _lock
        self._quiesced = False  # guarded by _lock
        self._start_failures = 0  # guarded by _lock
        self._start_error: str | None = None
        self._stats: dict[str, int] = dataclasses.asdict(PoolStats())  # guarded by _lock
        self._last_activity = time.monotonic()
        self._job_ids = itertools.count(1)
        self._events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._to_settle: list[tuple[Future, Any, BaseException | None]] = []  # manager thread only

        # Manager-thread state (_actors is changed under _lock too, for worker_pids()).
        self._actors: dict[int, _Actor] = {}
        self._serials = itertools.count(1)

        self._thread = threading.Thread(target=self._run, name="shmpool-ray", daemon=True)
        self._thread.start()
        _live_pools.add(self)

    # ---------------------------------------------------------------- caller side

    def submit(self, job_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        """Run ``job_fn(*args, **kwargs)`` on an actor. Pickling errors raise here, at once."""
        return self.submit_job(job_fn, args, kwargs)

    def submit_job(
        self,
        job_fn: Callable[..., Any],
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Future:
        """``submit`` with options: ``timeout`` seconds of running time, after which the
        future fails with ``JobTimeoutError`` and the actor is replaced."""
        if self._closing:
            raise RuntimeError("cannot submit to a RayPool after shutdown()")
        job_timeout = checked_seconds("timeout", timeout) if timeout is not None else self._job_timeout
        parts = dump_submitted(job_fn, args, kwargs, self.pickler, self._max_payload)
        wire = to_wire(parts)
        arg: Any = ray.put(wire) if parts.size >= INLINE_LIMIT else wire
        job = _Job(next(self._job_ids), JobFuture(), arg, parts.size, parts.oob_bytes,
                   job_timeout, describe_job(job_fn))
        del parts, wire
        with self._lock:
            if self._closing:
                raise RuntimeError("cannot submit to a RayPool after shutdown()")
            self._quiesced = False
            self._start_failures = 0  # a new job is worth one more start attempt
            self._stats["jobs_submitted"] += 1
            if isinstance(arg, ray.ObjectRef):
                self._stats["oneoff_segments"] += 1
            self._last_activity = time.monotonic()
            self._pending.append(job)
        self._events.put(("wake",))
        return job.future

    def quiesce(self) -> None:
        """Stop the actors to give their memory back; the next job or ``wakeup()`` restarts them."""
        with self._lock:
            if not self._pending:
                self._quiesced = True
        self._events.put(("wake",))

    def wakeup(self) -> None:
        """Start the actors now (after a quiesce), so the next job does not wait for them."""
        with self._lock:
            self._quiesced = False
            self._start_failures = 0
        self._events.put(("wake",))

    def shutdown(self, wait: bool = True) -> None:
        """Stop the pool: every unfinished future fails with RuntimeError, every actor is
        killed and every object this pool put is released. Idempotent; safe from atexit,
        another thread and a done-callback."""
        with self._lock:
            first = not self._closing
            self._closing = True
            pending = list(self._pending)
            self._pending.clear()
        if first:
            for job in pending:
                job.arg = None
                settle(job.future, exc=RuntimeError("SubprocPool closed"))
            self._events.put(("stop",))
        if wait and threading.current_thread() is not self._thread:
            self._thread.join(JOIN_LIMIT)

    def stats(self) -> PoolStats:
        """Counters as the local pool keeps them; ``oneoff_segments`` counts payloads put in
        Ray's object store (the rest went inline in the task spec)."""
        with self._lock:
            return PoolStats(**self._stats)

    def worker_pids(self) -> list[int]:
        """Pids of the ready actors (each on its own node: pids of several hosts may mix)."""
        with self._lock:
            return [w.pid for w in self._actors.values() if w.pid is not None and w.state in (_State.IDLE, _State.BUSY)]

    def worker_hosts(self) -> list[str]:
        """Host names of the ready actors, in the order of ``worker_pids()``."""
        with self._lock:
            return [w.host for w in self._actors.values() if w.host is not None and w.state in (_State.IDLE, _State.BUSY)]

    def helper_pids(self) -> list[int]:
        return []  # Ray starts the processes; there is no fork helper

    def __enter__(self) -> "RayPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---------------------------------------------------------------- manager thread

    def _run(self) -> None:
        try:
            while True:
                try:
                    event = self._events.get(timeout=self._next_timeout())
                except queue.Empty:
                    event = None
                events = [] if event is None else [event]
                while True:  # take every event that is already there: one round for all
                    try:
                        events.append(self._events.get_nowait())
                    except queue.Empty:
                        break
                stop = False
                ev: tuple[Any, ...] = ()
                for ev in events:
                    if ev[0] == "ready":
                        self._on_ready(ev[1], ev[2])
                    elif ev[0] == "reply":
                        self._on_reply(ev[1], ev[2], ev[3])
                    elif ev[0] == "stop":
                        stop = True
                # Drop the replies now: a resolved Ray future holds its result's object-store
                # views, which would pin the object until the next event.
                del events, event, ev
                if stop or self._closing:
                    self._teardown()
                    return
                now = time.monotonic()
                self._expire(now)
                self._start_or_stop_actors()
                self._place_pending(now)
                self._flush()
        except BaseException:  # a bug here must not leave futures hanging forever
            log.exception("shmpool RayPool manager thread failed; shutting the pool down")
            with self._lock:
                self._closing = True
            self._teardown()
            raise

    def _next_timeout(self) -> float | None:
        deadlines = [w.job.deadline for w in self._actors.values() if w.job is not None and w.job.deadline is not None]
        deadlines += [w.start_deadline for w in self._actors.values() if w.state is _State.STARTING]
        if self._auto_quiesce and not self._quiesced and self._actors:
            deadlines.append(self._last_activity + self._quiesce_after)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _watch(self, ref: Any, *event: Any) -> None:
        """Post ``event`` plus the future of ``ref`` to the queue once Ray resolves it."""
        ref.future().add_done_callback(lambda f: self._events.put((*event, f)))

    def _start_or_stop_actors(self) -> None:
        with self._lock:
            quiesced, failures = self._quiesced, self._start_failures
        if quiesced:
            for w in list(self._actors.values()):
                if w.state is not _State.BUSY:
                    self._retire(w)
            return
        if failures >= MAX_START_FAILURES:
            error = WorkerStartError(
                f"{failures} Ray actors in a row failed to start; last: {self._start_error}. "
                "Fix the cause (initializer, environment, cluster resources) and submit again."
            )
            with self._lock:
                failed, self._pending = list(self._pending), collections.deque()
            for job in failed:
                self._fail(job, error)
            return
        for _ in range(self.nprocs - len(self._actors)):
            serial = next(self._serials)
            w = _Actor(serial, self._actor_class.remote(), time.monotonic() + self._start_timeout)
            with self._lock:
                self._actors[serial] = w
                self._stats["workers_started"] += 1
            self._watch(w.handle.setup.remote(self._boot), "ready", w)

    def _on_ready(self, w: _Actor, answer: Future) -> None:
        if w.state is _State.GONE:
            return
        try:
            reply = answer.result()
        except RayError as e:
            reason = f"actor died before it was ready ({_ray_reason(e)})"
            with self._lock:
                self._start_failures += 1
            self._start_error = reason
            self._retire(w)
            return
        if reply[0] == _actor.ERROR:
            with self._lock:
                self._start_failures = MAX_START_FAILURES  # every start would fail the same way
            self._start_error = reply[2]
            self._retire(w)
            return
        _move(w, _State.IDLE)
        w.pid, w.host = reply[1], reply[2]
        with self._lock:
            self._start_failures = 0

    def _place_pending(self, now: float) -> None:
        for w in self._actors.values():
            if w.state is not _State.IDLE:
                continue
            with self._lock:
                job = None
                while self._pending and job is None:
                    job = self._pending.popleft()
                    if not job.future.set_running_or_notify_cancel():
                        job.arg, job = None, None  # cancelled while queued
                if job is None:
                    return
                self._stats["bytes_to_workers"] += job.size
                # Ray's put, plus the actor's read of all but what it uses in place, plus the
                # extra copy a dumps()-only pickler makes before we see the bytes.
                self._stats["copied_to_workers"] += job.size + (job.size - job.oob) + (0 if self._zero_copy else job.size)
                self._last_activity = now
            _move(w, _State.BUSY)
            w.job = job
            job.deadline = None if job.timeout is None else now + job.timeout
            self._watch(w.handle.run.remote(job.arg), "reply", w, job)

    def _on_reply(self, w: _Actor, job: _Job, answer: Future) -> None:
        job.arg = None  # the put object is freed once Ray's own reference is gone too
        if w.state is _State.GONE or w.job is not job:
            return  # timed out or shut down: already failed, the actor already killed
        w.job = None
        try:
            reply = answer.result()
        except RayActorError as e:
            with self._lock:
                self._stats["workers_died"] += 1
            self._fail(job, WorkerDiedError(w.pid or -1, None, f"job {job.desc} (Ray: {_ray_reason(e)})"))
            self._retire(w)
            return
        except RayError as e:  # the reply itself was lost (object lost, node gone)
            self._fail(job, self.remote_error_class(f"Ray could not deliver the result: {e}", type(e).__name__))
            self._retire(w)
            return
        del answer
        _move(w, _State.IDLE)
        value, exc, size = None, None, 0
        if reply[0] == _actor.OK:
            _, wire, size, _, recycle = reply
            try:
                value = from_wire(wire, self.pickler, copy_buffers=True)
            except Exception:
                exc = self.remote_error_class(
                    "the job's result could not be unpickled in the parent:\n" + traceback.format_exc()
                )
            del wire
        else:
            _, name, details, recycle = reply
            exc = self.remote_error_class(str(details), str(name))
        del reply
        if recycle:
            self._retire(w)  # over its memory cap: a fresh actor replaces it
        with self._lock:
            self._last_activity = time.monotonic()
            self._stats["bytes_from_workers"] += size
            self._stats["copied_from_workers"] += 2 * size  # the actor's store write, our read
            if not job.future.done():
                self._stats["jobs_completed" if exc is None else "jobs_failed"] += 1
        self._to_settle.append((job.future, value, exc))

    def _expire(self, now: float) -> None:
        for w in list(self._actors.values()):
            if w.state is _State.STARTING and now >= w.start_deadline:
                with self._lock:
                    self._start_failures += 1
                self._start_error = (
                    f"a Ray actor was not scheduled and set up within {self._start_timeout} s: check that the "
                    f"cluster offers what actor_options asks for ({self._actor_options_text})"
                )
                self._retire(w)
                continue
            job = w.job
            if job is not None and job.deadline is not None and now >= job.deadline:
                self._fail(job, JobTimeoutError(
                    f"job {job.desc} ran past its timeout of {job.timeout} s; "
                    f"its worker (pid {w.pid}, a Ray actor) was killed and will be replaced"
                ))
                self._retire(w)
        with self._lock:
            idle = not self._pending and all(w.job is None for w in self._actors.values())
            if self._auto_quiesce and idle and self._actors and now - self._last_activity >= self._quiesce_after:
                self._quiesced = True

    def _retire(self, w: _Actor) -> None:
        """Kill an actor and forget it; a job it held must already be settled. Never raises."""
        if w.state is not _State.GONE:
            _move(w, _State.GONE)
        with self._lock:
            self._actors.pop(w.serial, None)
        w.job = None
        try:
            ray.kill(w.handle, no_restart=True)
        except Exception:  # already dead, or Ray itself is shutting down
            pass

    def _fail(self, job: _Job, exc: BaseException) -> None:
        job.arg = None
        with self._lock:
            if not job.future.done():
                self._stats["jobs_failed"] += 1
        self._to_settle.append((job.future, None, exc))

    def _flush(self) -> None:
        todo, self._to_settle = self._to_settle, []
        for future, value, exc in todo:
            settle(future, value, exc)

    def _teardown(self) -> None:
        closed = RuntimeError("SubprocPool closed")
        with self._lock:
            left, self._pending = list(self._pending), collections.deque()
        for job in left:
            self._fail(job, closed)
        for w in list(self._actors.values()):
            if w.job is not None:
                self._fail(w.job, closed)
            self._retire(w)
        self._flush()
        _live_pools.discard(self)

"""The worker side: one Ray actor runs one job at a time, as a local pool worker does.

Every answer is a tuple whose first item says what it is, so the pool never has to read
meaning into a Ray exception: a Ray error reaching the pool means the actor itself failed
(died, was killed, or its node went away).
"""
from __future__ import annotations

import os
import socket
import sys
from typing import Any

from ..codec import dump
from ..errors import RESULT_NOT_PICKLED, PayloadTooLargeError, describe_error as _describe, unpickle_context
from ..pickler import SubprocPickler
from ..worker import rss_bytes, run_initializer
from .payload import Wire, from_wire, to_wire

READY, OK, ERROR = "ready", "ok", "error"



class Worker:
    """Plain class; the pool makes it a Ray actor (``ray.remote(Worker)``)."""

    def __init__(self) -> None:
        self.pickler: SubprocPickler = SubprocPickler()
        self.max_payload: int | None = None
        self.memory_cap: int | None = None

    def setup(self, boot: dict[str, Any]) -> tuple[Any, ...]:
        """Environment, then the caller's sys.path entries this node lacks, then the
        initializer. ``(READY, pid, host)`` or ``(ERROR, name, details)``."""
        for key, value in boot["environ"].items():
            os.environ[key] = value
        # Prepend, never replace: on another node some of the caller's paths do not exist and
        # Ray's own entries must stay.
        for path in reversed(boot["sys_path"]):
            if path not in sys.path:
                sys.path.insert(0, path)
        self.max_payload = boot["max_payload"]
        self.memory_cap = boot["memory_cap"]
        try:
            self.pickler = run_initializer(boot)
        except BaseException as e:
            return (ERROR, *_describe(e, "worker initializer failed"))
        return (READY, os.getpid(), socket.gethostname())

    def run(self, wire: Wire) -> tuple[Any, ...]:
        """Run one job. ``(OK, wire, size, oob_bytes, recycle)`` or ``(ERROR, name, details, recycle)``."""
        try:
            fn, args, kwargs = from_wire(wire, self.pickler, copy_buffers=False)
        except BaseException as e:
            return (ERROR, *_describe(e, unpickle_context(e)), False)
        del wire
        try:
            result: Any = fn(*args, **kwargs)
            failure = None
        except BaseException as e:
            result, failure = None, _describe(e)
        del fn, args, kwargs
        recycle = self.memory_cap is not None and rss_bytes() > self.memory_cap
        if failure is not None:
            return (ERROR, *failure, recycle)
        try:
            parts = dump(result, self.pickler)
        except BaseException as e:
            return (ERROR, *_describe(e, RESULT_NOT_PICKLED), recycle)
        if self.max_payload is not None and parts.size > self.max_payload:
            return (ERROR, *_describe(PayloadTooLargeError("the job's result", parts.size, self.max_payload)), recycle)
        # Ray stores the returned value (its out-of-band pieces in the object store) after this
        # returns, while `parts` still holds the result's objects.
        return (OK, to_wire(parts), parts.size, parts.oob_bytes, recycle)

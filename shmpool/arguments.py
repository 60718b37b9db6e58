"""What callers hand a pool, checked where they hand it: a wrong type or value is refused in the
caller's own call, with the argument and the fix named, before any process starts or any job is
counted. A worker that failed on it instead would show up far from the cause (a start failure,
a job's remote error)."""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

from .codec import Parts, dump_job
from .errors import PayloadTooLargeError
from .pickler import CloudPickler, SubprocPickler


def checked_seconds(name: str, value: float | None) -> float | None:
    """``value`` as a duration in seconds: None or infinity mean none; NaN, a negative number or
    anything not a number is the caller's mistake."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number of seconds or None, got {type(value).__name__} {value!r}")
    if math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be a number of seconds >= 0 or None, got {value!r}")
    return None if math.isinf(value) else float(value)


def checked_count(name: str, value: Any, minimum: int, unit: str = "", *, optional: bool = False) -> int | None:
    """``value`` as a whole number >= ``minimum`` (or None, where ``optional``)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        allowed = "an int or None" if optional else "an int"
        raise TypeError(f"{name} must be {allowed}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}{unit}, got {value}")
    return int(value)


def checked_callable(name: str, value: Any, *, optional: bool = False) -> None:
    if not callable(value) and not (optional and value is None):
        allowed = "callable or None" if optional else "callable"
        raise TypeError(f"{name} must be {allowed}, got {type(value).__name__} {value!r}")


def checked_env(env: Mapping[str, str] | None) -> dict[str, str]:
    """The workers' extra environment: str names to str values, all ``os.environ`` takes."""
    environ = dict(env or {})
    for key, value in environ.items():
        if not isinstance(key, str) or not isinstance(value, str) or not key or "=" in key or "\0" in key + value:
            raise ValueError(f"env must map variable names to str values, got {key!r}: {value!r}")
    return environ


def pickling_hint(pickler: SubprocPickler) -> str:
    """The note a job that cannot be pickled gets: why submit() pickles, and the usual fixes."""
    hint = "shmpool: submit() pickles job_fn, args and kwargs at once, to send them to a worker process, and this failed. "
    if not isinstance(pickler, CloudPickler):
        hint += "A lambda, a nested function or a class defined inside a function needs pickler=shmpool.CloudPickler(); "
    return hint + "locks, generators, open files and sockets cannot be sent to another process at all."


def dump_submitted(
    job_fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any] | None, pickler: SubprocPickler, max_payload: int | None
) -> Parts:
    """A submitted call, pickled: what the pickler raises is raised as torch's pool raises it,
    with a note on what to do about it."""
    checked_callable("job_fn", job_fn)
    try:
        return dump_job(job_fn, args, kwargs, pickler, max_payload)
    except PayloadTooLargeError:
        raise
    except Exception as e:
        e.add_note(pickling_hint(pickler))
        raise

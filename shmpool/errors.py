"""The exceptions a shmpool future can fail with. Each says what happened and what to do."""
from __future__ import annotations

import functools
import signal
import sys
import traceback
from concurrent.futures.process import BrokenProcessPool


class SubprocException(Exception):
    """A job raised in its worker. Same shape as torch's: ``details`` is the worker's traceback
    text (its last line names the exception and its message)."""

    def __init__(self, details: str, name: str = "<unknown>") -> None:
        self.details = details
        self.name = name
        super().__init__(f"An exception occurred in a subprocess:\n\nName={name}\n{details}")

    def with_name(self, name: str) -> "SubprocException":
        return type(self)(self.details, name)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.details, self.name))


# Where torch keeps its own SubprocException (the one inductor catches to name a failing kernel).
TORCH_POOL_MODULE = "torch._inductor.compile_worker.subproc_pool"


def remote_error(details: str, name: str = "<unknown>") -> SubprocException:
    """What a job that raised in its worker fails with: a SubprocException, which is torch's own
    class too whenever torch's pool module is loaded in this process, so that torch code and
    tests catching torch's class work on any shmpool pool. Imports nothing: a process that
    never loaded torch gets shmpool's class alone."""
    torch_class = getattr(sys.modules.get(TORCH_POOL_MODULE), "SubprocException", None)
    if isinstance(torch_class, type) and issubclass(torch_class, BaseException):
        return torch_flavoured(torch_class)(details, name)
    return SubprocException(details, name)


def remote_error_type() -> type[SubprocException]:
    """The class ``remote_error`` builds in this process now (torch's flavour once torch's pool
    module is loaded): what an exact-type check of a job's error compares against."""
    return type(remote_error("", ""))


@functools.cache
def torch_flavoured(torch_class: type) -> type[SubprocException]:
    """shmpool's SubprocException that is also ``torch_class`` (torch's SubprocException)."""

    class TorchSubprocException(SubprocException, torch_class):  # type: ignore[misc, valid-type]
        """A job raised in its worker: both shmpool's SubprocException and torch's.

        inductor's async_compile catches torch's class around every kernel future and re-raises
        ``e.with_name(kernel_name)``; shmpool callers catch shmpool's. Message, ``details`` and
        ``name`` are laid out as in both (torch's format: "An exception occurred in a
        subprocess:\n\nName={name}\n{details}"); ``name`` starts as the job's exception class
        name (torch's pool says "<unknown>" there) and ``with_name()`` keeps this class.
        """

        def __init__(self, details: str, name: str = "<unknown>") -> None:
            # Not super().__init__: through this MRO that is torch's __init__, which would take
            # the finished message for ``details`` and wrap it a second time.
            self.details = details
            self.name = name
            Exception.__init__(self, f"An exception occurred in a subprocess:\n\nName={name}\n{details}")

        def __reduce__(self) -> tuple[object, ...]:
            return (remote_error, (self.details, self.name))  # torch's flavour where torch is loaded

    TorchSubprocException.__module__ = __name__
    return TorchSubprocException


def describe_error(exc: BaseException, context: str = "") -> tuple[str, str]:
    """``(class name, traceback text led by context)``: what a worker sends back for a job that
    raised. Call it inside the except block and drop ``exc``: its traceback holds the job's
    frames, and through them views into its arguments."""
    details = "".join(traceback.format_exception(exc))
    return type(exc).__name__, f"{context}:\n{details}" if context else details


def unpickle_context(exc: BaseException) -> str:
    """What a worker says when a job cannot be unpickled there, with the usual fix when the
    cause is the usual one: a function or class that only the caller's process has."""
    text = str(exc)
    if isinstance(exc, AttributeError) and "'__main__'" in text:
        return (
            "job could not be unpickled in the worker (it refers to something defined in the caller's "
            "__main__, a script or a REPL, which workers do not run: move it into an importable module, "
            "or pass pickler=shmpool.CloudPickler() to pickle it by value)"
        )
    if isinstance(exc, ModuleNotFoundError):
        return (
            f"job could not be unpickled in the worker (module {exc.name!r} is not importable there: "
            "workers take the caller's sys.path when they start; install the module, or add its folder "
            "to sys.path before the pool starts its workers)"
        )
    return "job could not be unpickled in the worker"


# What a worker says when a job's result cannot be pickled to send it back.
RESULT_NOT_PICKLED = (
    "result could not be pickled to send it back (return plain data, bytes, arrays or tensors; "
    "the pool's pickler=shmpool.CloudPickler() also takes lambdas and closures; locks, generators, "
    "open files and sockets cannot leave the worker)"
)


def describe_job(fn: object) -> str:
    """``module.qualname`` of a job function, as job errors name it."""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
    module = getattr(fn, "__module__", None)
    return f"{module}.{name}" if module else str(name)


def describe_exit(exitcode: int | None) -> str:
    """'SIGSEGV', 'SIGKILL', 'exit code 1' or 'unknown exit status'. Negative codes are signals,
    as in ``subprocess.Popen.returncode``."""
    if exitcode is None:
        return "unknown exit status"
    if exitcode < 0:
        try:
            return signal.Signals(-exitcode).name
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


_LIKELY_CAUSE = {
    -signal.SIGKILL: "killed from outside, or by the kernel's OOM killer",
    -signal.SIGSEGV: "a segfault in native code run by the job",
    -signal.SIGBUS: "a bus error (shared memory exhausted?)",
    -signal.SIGABRT: "an abort() in native code",
}


class WorkerDiedError(BrokenProcessPool):
    """The worker running this job died before answering. Only this job fails; the worker is
    replaced and the pool goes on."""

    def __init__(self, pid: int, exitcode: int | None, job_desc: str = "") -> None:
        self.pid = pid
        self.exitcode = exitcode
        cause = _LIKELY_CAUSE.get(exitcode or 0, "")
        what = describe_exit(exitcode)
        msg = f"worker pid {pid} died ({what}) while running {job_desc or 'a job'}"
        if cause:
            msg += f"; likely {cause}"
        super().__init__(msg + ". The worker was replaced; resubmit the job if it is safe to retry.")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.pid, self.exitcode))


class JobTimeoutError(TimeoutError):
    """A job ran past its per-job timeout; its worker was killed and replaced."""


class PayloadTooLargeError(ValueError):
    """A pickled job or result is over the pool's ``max_payload`` cap."""

    def __init__(self, what: str, size: int, cap: int) -> None:
        self.size = size
        self.cap = cap
        super().__init__(f"{what} pickles to {size:,} bytes, over the pool's max_payload of {cap:,} bytes")

    def __reduce__(self) -> tuple[object, ...]:
        return (_payload_too_large, (str(self), self.size, self.cap))


def _payload_too_large(msg: str, size: int, cap: int) -> PayloadTooLargeError:
    err = PayloadTooLargeError.__new__(PayloadTooLargeError)
    ValueError.__init__(err, msg)
    err.size, err.cap = size, cap
    return err


class WorkerStartError(BrokenProcessPool):
    """Workers could not be started (the initializer raised, or they died during start-up)."""

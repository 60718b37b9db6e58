"""shmpool: a process pool whose payloads move through shared memory.

A drop-in for ``torch._inductor.compile_worker.subproc_pool.SubprocPool``; importing shmpool
does not import torch (``shmpool.torch`` holds the torch glue).
"""
from .codec import CodecError
from .errors import (
    JobTimeoutError,
    PayloadTooLargeError,
    SubprocException,
    WorkerDiedError,
    WorkerStartError,
)
from .pickler import CloudPickler, SubprocPickler
from .pool import PoolStats, SubprocKind, SubprocPool
from .shm import SharedMemoryError

__all__ = [
    "CloudPickler",
    "CodecError",
    "JobTimeoutError",
    "PayloadTooLargeError",
    "PoolStats",
    "SharedMemoryError",
    "SubprocException",
    "SubprocKind",
    "SubprocPickler",
    "SubprocPool",
    "WorkerDiedError",
    "WorkerStartError",
]
__version__ = "0.1.0"

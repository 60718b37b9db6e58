"""Picklers: torch's ``SubprocPickler`` interface, plus the zero-copy hooks shmpool uses.

A pickler that keeps the base class's ``make_pickler``/``loads_from`` gets the zero-copy path:
pickle protocol 5 writes large ``bytes`` straight to the sink by reference and hands contiguous
buffers (numpy arrays, ``PickleBuffer``) out of band, so nothing of the payload is copied before
shmpool's single copy into shared memory. A subclass that overrides only ``dumps``/``loads``
(torch's contract) still works: its ``dumps`` output is copied into shared memory as one buffer.
"""
from __future__ import annotations

import collections
import pickle
from collections.abc import Callable, Sequence
from typing import IO, Any

from . import tensors
from .pages import HUGE_COPY_BYTES, RegionFile


class SubprocPickler:
    """Pickle with the highest protocol; a drop-in for torch's class of the same name."""

    def dumps(self, obj: object) -> bytes:
        return pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)

    def loads(self, data: bytes) -> object:
        return pickle.loads(data)

    def make_pickler(self, file: IO[bytes], buffer_callback: Callable[[pickle.PickleBuffer], Any]) -> pickle.Pickler:
        pickler = pickle.Pickler(file, protocol=5, buffer_callback=buffer_callback)
        storages = tensors.dispatch_table()
        if storages is not None:
            pickler.dispatch_table = storages  # torch CPU storages out of band
        return pickler

    def loads_from(self, data: memoryview, buffers: Sequence[Any]) -> object:
        if data.nbytes >= HUGE_COPY_BYTES:  # big in-band bytes: let them land on huge pages
            return pickle.Unpickler(RegionFile(data), buffers=buffers).load()
        return pickle.loads(data, buffers=buffers)


class CloudPickler(SubprocPickler):
    """cloudpickle for lambdas, closures and functions defined in ``__main__``."""

    def dumps(self, obj: object) -> bytes:
        import cloudpickle

        return cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)

    def make_pickler(self, file: IO[bytes], buffer_callback: Callable[[pickle.PickleBuffer], Any]) -> pickle.Pickler:
        import cloudpickle

        pickler = cloudpickle.CloudPickler(file, protocol=5, buffer_callback=buffer_callback)
        storages = tensors.dispatch_table()
        if storages is not None:  # in front of cloudpickle's own table, which it needs
            pickler.dispatch_table = collections.ChainMap(storages, pickler.dispatch_table)
        return pickler


_zero_copy_by_type: dict[type, bool] = {}  # asked per message: answer once per class


def has_zero_copy(pickler: object) -> bool:
    """True when ``pickler`` speaks the zero-copy hooks and has not redefined the format by
    overriding ``dumps`` alone."""
    cls = type(pickler)
    known = _zero_copy_by_type.get(cls)
    if known is None:
        overrides_dumps = getattr(cls, "dumps", None) is not SubprocPickler.dumps
        overrides_hook = getattr(cls, "make_pickler", None) is not SubprocPickler.make_pickler
        known = _zero_copy_by_type[cls] = issubclass(cls, SubprocPickler) and (not overrides_dumps or overrides_hook)
    return known

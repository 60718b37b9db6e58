"""torch CPU storages out of band: a tensor's bytes travel as a pickle-5 buffer.

Plain pickle reduces every tensor storage with ``torch.save`` into a ``bytes`` that the other
side parses back: several copies and a serializer pass per storage (256 MiB of weights took
2 s through shmpool that way, against 0.27 s through ``ProcessPoolExecutor``, whose
``ForkingPickler`` torch teaches to share storages). shmpool's picklers reduce a CPU storage to
its raw bytes as an out-of-band buffer instead: written into shared memory once, used in place
by a job that receives it, copied once into the parent for a result, like a numpy array.
Tensors keep torch's own reduction (views, offsets, strides, ``requires_grad``, ``Parameter``);
only the storage under them changes. Other devices keep torch's default.

``import shmpool`` never imports torch: ``dispatch_table`` answers None until torch is loaded.
Uses ``TypedStorage._untyped_storage`` and ``TypedStorage(..., _internal=True)``, as torch's own
reduce and rebuild functions do, to avoid its deprecation warnings; checked against torch 2.13.0 (2.14.1's ``storage.py`` reads the same).
"""
from __future__ import annotations

import copyreg
import pickle
import sys
from typing import Any

_table: dict[Any, Any] | None = None
_table_base_len = -1


def dispatch_table() -> dict[Any, Any] | None:
    """``copyreg.dispatch_table`` plus the storage reducers, or None while torch is not loaded.
    Rebuilt when someone registers another reducer with copyreg."""
    global _table, _table_base_len
    torch = sys.modules.get("torch")
    if torch is None or not hasattr(torch, "UntypedStorage"):
        return None
    if _table is None or _table_base_len != len(copyreg.dispatch_table):
        _table = dict(copyreg.dispatch_table)
        _table[torch.storage.TypedStorage] = _reduce_typed
        _table[torch.UntypedStorage] = _reduce_untyped
        _table_base_len = len(copyreg.dispatch_table)
    return _table


def _raw_bytes(untyped: Any) -> pickle.PickleBuffer | bytes:
    """The storage's bytes, shared, as a buffer pickle can send out of band."""
    import torch

    if untyped.nbytes() == 0:
        return b""
    return pickle.PickleBuffer(torch.empty(0, dtype=torch.uint8).set_(untyped).numpy())


def _reduce_untyped(storage: Any) -> tuple[Any, ...]:
    if storage.device.type != "cpu":
        return storage.__reduce__()
    return _rebuild_untyped, (_raw_bytes(storage),)


def _reduce_typed(storage: Any) -> tuple[Any, ...]:
    untyped = storage._untyped_storage  # the public .untyped() and .device warn of deprecation
    if untyped.device.type != "cpu":
        return storage.__reduce__()
    return _rebuild_typed, (_raw_bytes(untyped), storage.dtype)


def _rebuild_untyped(data: Any) -> Any:
    import torch

    if memoryview(data).nbytes == 0:
        return torch.UntypedStorage(0)
    # Shares ``data`` (a view of the ring for a job's argument, a private copy for a result)
    # and holds a reference to it for as long as the storage lives.
    return torch.frombuffer(data, dtype=torch.uint8).untyped_storage()


def _rebuild_typed(data: Any, dtype: Any) -> Any:
    import torch

    return torch.storage.TypedStorage(wrap_storage=_rebuild_untyped(data), dtype=dtype, _internal=True)

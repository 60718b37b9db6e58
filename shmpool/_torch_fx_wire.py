"""Subprocess FX jobs with their tensor storages out of band: frozen weights cross once, by mapping.

torch pickles a subprocess FX job (``_WireProtocolInput``: the graph, its example inputs, the
tracing context...) with ``GraphPickler.dumps`` into one ``bytes``. Every CPU storage in it goes
through ``TypedStorage.__reduce__``, which ``torch.save``s it into bytes of its own, once per
tensor object that refers to it: with freezing on, each weight is a graph constant and also a
parameter of the original module kept in ``tracing_context.module_context``, so it is saved twice,
and the job is twice the weights. The worker then parses both copies back.

With shmpool installed, the job is pickled by ``_OutOfBandGraphPickler`` instead::

  parent                                               worker
  ------                                               ------
  GraphPickler stream, each storage -> an index        the pool hands the job its buffers as
  buffers[index] = PickleBuffer over the storage         views of shared memory (no copy)
    (one per distinct storage, however many          OutOfBandPickledInput.deserialize():
     tensors refer to it; no copy)                     torch's GraphPickler.loads on the stream;
  OutOfBandPickledInput(stream, buffers)                 index -> torch.frombuffer(view): the
    -> pool.submit: the pool's protocol-5 pickler         weights are the mapping itself
       writes each buffer into shared memory: COPY 1   compile, reply as torch does (no weights)

Copies per weight byte on the way in: 1 (the parent's write into shared memory), against 4 or more
for torch's bytes. The worker's tensors are views of the job's slot, which the worker holds until
its reply is sent and then frees: a compile that keeps no tensor past the job keeps no payload.
Inductor may write into what it thinks are its weights (it does not, in the frozen-weight paths
read for this); such writes land in the job's private slot, never in the parent's tensors.

Only the FX job's *input* changes; the compiled result comes back as torch pickles it (it carries
no weights: the parent takes the frozen constants from its own graph), and the worker still runs
torch's ``_run_in_child_subprocess`` unchanged: the stream is torch's own format, except that
storages name an index into the job's buffers. While installed this holds for every serialized
FX-compile mode: ``_DebugSerdeFxCompile`` (in-process) works the same way; ``_DebugFileFxCompile``
writes ``.value`` alone to a file and would lose the weights, so uninstall before using it.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import io
import pickle
import threading
from collections.abc import Iterator
from typing import Any

import torch

from . import _torch_compat
from .tensors import _raw_bytes

_classes = _torch_compat.fx_wire_classes()
SUPPORTED = _classes is not None
if _classes is not None:
    _WireProtocolInput, _WireProtocolPickledInput, _GraphPickler = _classes
else:  # pragma: no cover - a torch without these keeps its own pickling (see install())
    _WireProtocolInput = _WireProtocolPickledInput = _GraphPickler = object


@dataclasses.dataclass(frozen=True)
class FxWireStats:
    """What the FX jobs pickled by shmpool in this process carried, since it started.

    ``storage_refs / storages`` is how many times the average storage was referred to (2 for a
    frozen weight: graph constant and module parameter), each crossing once all the same.
    Copies are the pool's to count: ``fx_process_pool().stats()``."""

    jobs: int = 0
    storages: int = 0  # distinct storages sent, each as one out-of-band buffer
    storage_refs: int = 0  # references to them met while pickling
    storage_bytes: int = 0  # their bytes: what crosses out of band
    stream_bytes: int = 0  # the pickle stream around them: what crosses in band


_stats_lock = threading.Lock()
_stats = dataclasses.asdict(FxWireStats())


def stats() -> FxWireStats:
    with _stats_lock:
        return FxWireStats(**_stats)


def _count(**deltas: int) -> None:
    with _stats_lock:
        for key, n in deltas.items():
            _stats[key] += n


def _cpu_untyped(obj: object) -> Any:
    """The CPU UntypedStorage ``obj`` is or wraps, else None."""
    if isinstance(obj, torch.UntypedStorage):
        untyped = obj
    elif isinstance(obj, torch.storage.TypedStorage):
        untyped = obj._untyped_storage  # the public .untyped() warns of deprecation
    else:
        return None
    return untyped if untyped.device.type == "cpu" else None


class _OutOfBandGraphPickler(_GraphPickler):  # type: ignore[misc, valid-type]
    """torch's GraphPickler, with each distinct CPU storage reduced to an index into ``buffers``."""

    def __init__(self, file: io.BytesIO, options: Any = None) -> None:
        super().__init__(file, options)
        self.buffers: list[pickle.PickleBuffer | bytes] = []
        self.storage_refs = 0
        self.storage_bytes = 0
        self._index: dict[int, int] = {}
        # The storages indexed, kept alive while pickling so no _cdata key is reused.
        self._storages: list[Any] = []

    def reducer_override(self, obj: object) -> Any:
        untyped = _cpu_untyped(obj)
        if untyped is None:
            return super().reducer_override(obj)
        self.storage_refs += 1
        key = untyped._cdata  # the StorageImpl: one per storage, whatever wraps or views it
        index = self._index.get(key)
        if index is None:
            index = self._index[key] = len(self.buffers)
            self.buffers.append(_raw_bytes(untyped))
            self._storages.append(untyped)
            self.storage_bytes += untyped.nbytes()
        if isinstance(obj, torch.storage.TypedStorage):
            return _rebuild_typed, (index, obj.dtype)
        return _rebuild_untyped, (index,)


class OutOfBandPickledInput(_WireProtocolPickledInput):  # type: ignore[misc, valid-type]
    """torch's pickled FX job, its storages beside the stream as buffers the pool sends out of band.

    ``value`` is the GraphPickler stream (storages named by index); ``buffers[i]`` is storage i's
    bytes: a PickleBuffer over the parent's tensor, then, in the worker, a view of shared memory."""

    def __init__(self, value: bytes, buffers: list[Any]) -> None:
        super().__init__(value)
        self.buffers = buffers

    def deserialize(self) -> Any:
        token = _current.set(_Storages(self.buffers))
        try:
            return super().deserialize()
        finally:
            _current.reset(token)


def serialize(self: Any) -> OutOfBandPickledInput:
    """Replaces ``_WireProtocolInput.serialize`` while shmpool is installed."""
    with io.BytesIO() as file:
        pickler = _torch_compat.graph_pickler_dump(_OutOfBandGraphPickler, self, file)
        stream = file.getvalue()
    _count(
        jobs=1,
        storages=len(pickler.buffers),
        storage_refs=pickler.storage_refs,
        storage_bytes=pickler.storage_bytes,
        stream_bytes=len(stream),
    )
    return OutOfBandPickledInput(stream, pickler.buffers)


def enable() -> bool:
    """Pickle FX jobs with their storages out of band from now on. False if this torch cannot."""
    if not SUPPORTED:
        return False
    _torch_compat.set_fx_input_serializer(serialize)
    return True


def disable() -> None:
    _torch_compat.set_fx_input_serializer(None)


def is_enabled() -> bool:
    return SUPPORTED and _WireProtocolInput.__dict__.get("serialize") is serialize


@contextlib.contextmanager
def enabled(on: bool) -> Iterator[None]:
    """Storages out of band (True) or torch's own pickling (False) for the block."""
    was = is_enabled()
    enable() if on else disable()
    try:
        yield
    finally:
        enable() if was else disable()


# --- the worker's side: storages rebuilt from the job's buffers ---------------------------------


class _Storages:
    """The storages of one job being unpickled: built on first reference, then shared."""

    __slots__ = ("buffers", "built")

    def __init__(self, buffers: list[Any]) -> None:
        self.buffers = buffers
        self.built: dict[int, Any] = {}

    def get(self, index: int) -> Any:
        storage = self.built.get(index)
        if storage is None:
            if not 0 <= index < len(self.buffers):
                raise pickle.UnpicklingError(f"storage {index} of a job with {len(self.buffers)} buffers")
            data = self.buffers[index]
            if memoryview(data).nbytes == 0:
                storage = torch.UntypedStorage(0)
            else:
                # A view of the buffer (shared memory in a worker), holding it while it lives.
                storage = torch.frombuffer(data, dtype=torch.uint8).untyped_storage()
            self.built[index] = storage
        return storage


# Set only while an OutOfBandPickledInput is being unpickled, in that thread.
_current: contextvars.ContextVar[_Storages | None] = contextvars.ContextVar("shmpool_fx_storages", default=None)


def _storages() -> _Storages:
    storages = _current.get()
    if storages is None:
        raise pickle.UnpicklingError("an out-of-band storage outside OutOfBandPickledInput.deserialize()")
    return storages


def _rebuild_untyped(index: int) -> Any:
    return _storages().get(index)


def _rebuild_typed(index: int, dtype: Any) -> Any:
    return torch.storage.TypedStorage(wrap_storage=_storages().get(index), dtype=dtype, _internal=True)

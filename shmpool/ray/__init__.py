"""shmpool's pool API on Ray: workers are Ray actors, payloads cross Ray's object store.

    from shmpool.ray import RayPool
    pool = RayPool(4)                      # a local Ray (ray.init(num_cpus=...)), or:
    pool = RayPool(4, address="auto")      # join a running cluster ("ray://host:10001" too)

``import shmpool`` never imports Ray; this module needs the ``ray`` extra.
"""
from __future__ import annotations

try:
    import ray  # noqa: F401  (absolute: the top-level Ray, not this package)
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "shmpool.ray needs Ray, which is not installed: install the ray extra with "
        "`pip install shmpool[ray]`"
    ) from e

from .pool import RayPool, connect

__all__ = ["RayPool", "connect"]

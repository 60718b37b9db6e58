"""Job functions only the Ray tests use (the shared ones are in tests/corejobs.py)."""
from __future__ import annotations

import os
import signal


def kill_self(signum: int) -> None:
    os.kill(os.getpid(), signum)


def node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def length(data: bytes) -> int:
    return len(data)

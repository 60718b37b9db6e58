"""Constants and helpers of the Ray tests (a module of their own, so test modules never import
a conftest by name). Imports Ray only inside functions: this loads without the extra."""
from __future__ import annotations

import re
import time

# Per node: enough for the 64 MiB round trips (payload and result both in the store) with room.
OBJECT_STORE_BYTES = 400 << 20
REMOTE_RESOURCE = "shmpool_remote"  # offered by the second node only
# A quarter CPU per actor: a 2-core machine runs a pool of two plus the replacements the crash
# tests start while Ray still releases the dead ones' share.
TEST_ACTOR_OPTIONS = {"num_cpus": 0.25}
STORE_EMPTY_DEADLINE_S = 30.0  # Ray frees objects asynchronously once the last reference goes
SKIP_REASON = "the ray extra is not installed (pip install shmpool[ray])"


def store_objects() -> tuple[int, int]:
    """(objects, MiB) in every node's object store.

    Ray has no public call for this without the dashboard; ``memory_summary`` (the engine of
    ``ray memory``) is the one way. Private: isolated here, checked against Ray 2.60.0.
    """
    from ray._private.internal_api import memory_summary

    text = memory_summary(stats_only=True)
    m = re.search(r"Plasma memory usage (\d+) MiB, (\d+) objects", text)
    assert m, f"unexpected memory summary: {text!r}"
    return int(m.group(2)), int(m.group(1))


def wait_store_empty() -> tuple[int, int]:
    deadline = time.monotonic() + STORE_EMPTY_DEADLINE_S
    while (left := store_objects())[0] and time.monotonic() < deadline:
        time.sleep(0.2)
    return left

"""Warm segments for payloads over the ring (spares.py): reused, never seen by the wrong job,
and given back on quiesce, on idle, under a cap and when an allocation needs the memory."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import corejobs
from corejobs import RESULT_TIMEOUT
from shmpool import spares

RING = 1 << 20  # the smallest ring: everything below goes over it
BIG = 3 * RING


def test_big_payloads_reuse_one_warm_segment_both_ways(make_pool) -> None:
    pool = make_pool(1, ring_size=RING)
    for i in range(4):
        payload = os.urandom(BIG + i * 4096)
        assert pool.submit(corejobs.echo, payload).result(RESULT_TIMEOUT) == payload
    stats = pool.stats()
    # Job 1 takes a fresh segment and its result goes back in it; every later job reuses it.
    assert stats.oneoff_segments == 4
    assert stats.warm_segments == 4 + 3, stats
    assert BIG <= stats.spare_bytes <= 2 * BIG, stats


def test_a_result_bigger_than_its_job_grows_the_jobs_segment(make_pool) -> None:
    pool = make_pool(1, ring_size=RING)
    data = os.urandom(BIG)
    back = pool.submit(corejobs.grow, data, 3).result(RESULT_TIMEOUT)
    assert back == data * 3
    assert pool.stats().warm_segments == 1
    # The grown segment serves the next payload of that size, and its bytes are the new job's.
    data2 = os.urandom(3 * BIG)
    assert pool.submit(corejobs.sha256, data2).result(RESULT_TIMEOUT) == corejobs.sha256(data2)
    assert pool.stats().warm_segments == 2


def test_a_kept_in_place_argument_never_sees_a_later_jobs_bytes(make_pool) -> None:
    pool = make_pool(1, ring_size=RING)
    rng = np.random.default_rng(1)
    first, second = (rng.integers(0, 255, BIG, dtype=np.uint8) for _ in range(2))
    digest = corejobs.sha256(first.tobytes())
    assert pool.submit(corejobs.keep_argument, first).result(RESULT_TIMEOUT) == digest
    # The worker still maps the first job's segment: the parent must not write into it again.
    assert pool.stats().spare_bytes == 0
    assert pool.submit(corejobs.keep_argument, second).result(RESULT_TIMEOUT) == corejobs.sha256(second.tobytes())
    assert pool.submit(corejobs.kept_digests).result(RESULT_TIMEOUT) == [digest, corejobs.sha256(second.tobytes())]


def test_an_argument_held_only_by_a_reference_cycle_does_not_cost_the_warm_segment(make_pool) -> None:
    pool = make_pool(1, ring_size=RING)
    for i in range(2):
        arr = np.full(BIG, i + 1, dtype=np.uint8)
        assert pool.submit(corejobs.hold_in_a_cycle, arr).result(RESULT_TIMEOUT) == i + 1
        assert pool.stats().spare_bytes >= BIG  # collected before the reply, not KEPT
    assert pool.stats().warm_segments == 1


def test_the_reply_does_not_wait_for_the_full_collection_that_warms_the_segment(make_pool, tmp_path) -> None:
    # An argument freed only by a full collection (an FX graph's weights after a long job): the
    # worker answers first and settles the segment after (wire.Flag.UNSETTLED, SETTLED).
    pool = make_pool(1, ring_size=RING)
    marker = tmp_path / "collected"
    arr = np.full(BIG, 7, dtype=np.uint8)
    assert pool.submit(corejobs.hold_in_an_old_cycle, arr, str(marker), 2.0).result(RESULT_TIMEOUT) == 7
    assert not marker.exists()  # the answer came before the collection (which takes >= 2 s)
    _wait_for(lambda: pool.stats().spare_bytes >= BIG)  # then SETTLED: the segment is warm
    assert marker.exists()
    second = np.full(BIG, 9, dtype=np.uint8)
    assert pool.submit(corejobs.hold_in_an_old_cycle, second, str(marker), 0.0).result(RESULT_TIMEOUT) == 9
    assert pool.stats().warm_segments == 1


def test_quiesce_gives_the_warm_segments_back(make_pool) -> None:
    pool = make_pool(1, ring_size=RING)
    pool.submit(corejobs.echo, os.urandom(BIG)).result(RESULT_TIMEOUT)
    assert pool.stats().spare_bytes >= BIG
    pool.quiesce()
    _wait_for(lambda: pool.stats().spare_bytes == 0)


def test_idle_warm_segments_are_given_back(make_pool, monkeypatch) -> None:
    monkeypatch.setattr(spares, "IDLE_SECONDS", 0.3)
    pool = make_pool(1, ring_size=RING)
    pool.submit(corejobs.echo, os.urandom(BIG)).result(RESULT_TIMEOUT)
    assert pool.stats().spare_bytes >= BIG
    _wait_for(lambda: pool.stats().spare_bytes == 0)  # the dispatcher's own deadline, no submit


def test_max_spare_bytes_zero_keeps_none(make_pool) -> None:
    pool = make_pool(1, ring_size=RING, max_spare_bytes=0)
    for _ in range(2):
        payload = os.urandom(BIG)
        assert pool.submit(corejobs.echo, payload).result(RESULT_TIMEOUT) == payload
    stats = pool.stats()
    assert stats.spare_bytes == 0 and stats.warm_segments == 2  # each result in its job's segment only


def test_the_cap_drops_the_oldest() -> None:
    kept = spares.SpareSegments(limit=5 << 20)
    segments = [kept.create(size, "test") for size in (2 << 20, 2 << 20, 2 << 20)]
    for segment in segments:
        kept.give(segment)
    assert kept.kept_bytes == 4 << 20
    assert segments[0].fd == -1  # closed
    assert kept.clear() == 4 << 20 and kept.kept_bytes == 0


def test_a_kept_segment_never_makes_an_allocation_fail() -> None:
    """Under an address-space limit with room for one big segment: holding a spare that does
    not fit the next payload, the next allocation gives the spare back and succeeds."""
    code = textwrap.dedent(
        """
        import resource
        from shmpool.spares import SpareSegments
        MiB = 1 << 20
        kept = SpareSegments(limit=1 << 40)
        kept.give(kept.create(512 * MiB, "spare"))
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + 96 * MiB, resource.RLIM_INFINITY))
        segment = kept.create(100 * MiB, "next")  # 512 MiB > 4x: not lent; a fresh one needs the room
        assert segment.size == 100 * MiB and kept.kept_bytes == 0
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=RESULT_TIMEOUT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)

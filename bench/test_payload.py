"""Round trip of N bytes in and N bytes back (``echo``), shmpool beside its peers."""
import pytest

from shmpool.bench import workloads as w

QUICK = [(w.KiB, 20), (w.MiB, 10), (16 * w.MiB, 5)]  # (size, rounds)
FULL_ONLY = [(64 * w.MiB, 5), (256 * w.MiB, 3)]


@pytest.mark.parametrize("size,rounds",
                         [pytest.param(s, r, id=w.fmt_size(s)) for s, r in QUICK]
                         + [pytest.param(s, r, id=w.fmt_size(s), marks=pytest.mark.full) for s, r in FULL_ONLY])
def test_payload(measure, size, rounds, pool_name):
    payload = w.payload_bytes(size)
    measure(f"payload-{w.fmt_size(size)}", w.fmt_size(size), w.run_echo, payload, w.job_timeout(2 * size),
            rounds=rounds, bytes_moved=2 * size)

"""Big argument / small result, and small argument / big result."""
import pytest

from shmpool.bench import workloads as w

SIZE = 16 * w.MiB
ROUNDS = 5


def test_big_argument(measure, pool_name):
    payload = w.payload_bytes(SIZE)
    measure(f"oneway-arg-{w.fmt_size(SIZE)}", "arg", w.run_consume, payload, w.job_timeout(SIZE),
            rounds=ROUNDS, bytes_moved=SIZE)


def test_big_result(measure, pool_name):
    measure(f"oneway-result-{w.fmt_size(SIZE)}", "result", w.run_produce, SIZE, w.job_timeout(SIZE),
            rounds=ROUNDS, bytes_moved=SIZE)

"""A large ndarray argument and result (shmpool's out-of-band path) beside the same bytes as ``bytes``."""
import pytest

from shmpool.bench import workloads as w

pytest.importorskip("numpy")
SIZE = 16 * w.MiB
ROUNDS = 5


@pytest.mark.parametrize("kind", ["ndarray", "bytes"])
def test_numpy_echo(measure, pool, kind, pool_name):
    if kind == "ndarray":
        pool.warm(("numpy",))  # the worker's first ndarray would otherwise pay for importing numpy
        payload, fn = w.make_array(SIZE), w.run_echo_array
    else:
        payload, fn = w.payload_bytes(SIZE), w.run_echo
    measure(f"numpy-{w.fmt_size(SIZE)}", kind, fn, payload, w.job_timeout(2 * SIZE), rounds=ROUNDS,
            bytes_moved=2 * SIZE)

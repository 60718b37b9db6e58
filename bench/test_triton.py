"""16 real Triton kernels compiled in the workers, cubins shipped back (--bench-full only)."""
import pytest

from shmpool.bench import workloads as w

N = w.TRITON_KERNELS


@pytest.mark.full
def test_triton_batch(measure, pool, pool_name):
    _, why = w._triton_batch()
    if why:
        pytest.skip(why)
    pool.warm(("triton", "triton.compiler"), timeout=w.BASE_TIMEOUT_S + 30.0 * N)
    measure(f"triton-{N}-kernels", "compile", w.run_triton, N, w.BASE_TIMEOUT_S + 30.0 * N, rounds=2)

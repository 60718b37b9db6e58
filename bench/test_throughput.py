"""3000 tiny jobs (operator.add) submitted at once to 2 workers: jobs/s is 3000 / median."""
from shmpool.bench import workloads as w

JOBS = w.THROUGHPUT_JOBS
ROUNDS = 3


def test_throughput(measure, pool_name):
    measure(f"throughput-{JOBS}-add", "add", w.run_throughput, JOBS, w.BASE_TIMEOUT_S, rounds=ROUNDS,
            warm_args=(JOBS // 10, w.BASE_TIMEOUT_S))

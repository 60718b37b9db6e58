"""The core pool contract on RayPool: the local pool's own tests, run here against Ray actors.

Imported from tests/test_pool.py, not copied: pytest collects them in this module, where this
folder's ``make_pool``/``pool`` fixtures build RayPools. Left out, and why:
- test_payload_bigger_than_the_ring_uses_a_one_off_segment, test_one_gib_round_trip: rings
  and one-off segments are the local pool's (Ray's store holds any size it has room for);
- test_worker_death_fails_only_its_job_and_is_replaced: Ray does not report an actor's exit
  code, so its Ray twin is in test_ray_pool.py with ``exitcode is None``.
"""
from __future__ import annotations

import pytest

from rayutil import SKIP_REASON

pytest.importorskip("ray", reason=SKIP_REASON)

from test_pool import (  # noqa: F401  (collected by pytest)
    test_a_failing_initializer_fails_jobs_instead_of_hanging,
    test_a_job_raising_while_it_views_its_array_argument_costs_no_worker,
    test_a_module_next_to_a_script_reaches_the_workers,
    test_a_raising_job_gives_subproc_exception_with_the_traceback,
    test_a_result_that_views_its_argument_is_sent_before_the_slot_is_reused,
    test_args_kwargs_and_many_jobs_from_threads,
    test_cancelled_queued_job_never_runs,
    test_cloudpickle_lambdas_and_closures,
    test_copies_per_byte_for_bytes_are_two_each_way,
    test_initializer_runs_in_every_worker_start,
    test_jobs_run_in_other_processes_of_the_right_count,
    test_killing_every_process_at_once_then_submitting_works,
    test_memory_cap_recycles_the_worker_between_jobs,
    test_numpy_arguments_arrive_in_place_and_results_come_back,
    test_payload_caps,
    test_payload_round_trip,
    test_quiesce_stops_workers_and_the_next_job_restarts_them,
    test_quiesce_true_quiesces_by_itself_when_idle,
    test_shutdown_fails_pending_jobs_and_is_idempotent,
    test_shutdown_from_a_done_callback,
    test_timeout_fails_the_job_and_replaces_the_worker,
    test_unpicklable_job_raises_from_submit,
    test_unpicklable_result_fails_that_job_only,
)  # noqa: E402

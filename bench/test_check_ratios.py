"""Unit tests of scripts/check_bench_ratios.py on synthetic benchmark JSON (no pools, no timing)."""
import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "check_bench_ratios.py")
DEADLINE_S = 60


def bench_json(tmp_path, medians: dict[tuple[str, str, str], float]):
    """pytest-benchmark-shaped JSON: {(group, case, pool): median_seconds}."""
    doc = {"benchmarks": [
        {"group": g, "name": f"test[{p}]", "params": {"pool_name": p}, "extra_info": {"pool": p, "case": c},
         "stats": {"median": m, "mean": m, "rounds": 3}}
        for (g, c, p), m in medians.items()]}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(doc))
    return str(path)


def floors_json(tmp_path, floors):
    path = tmp_path / "floors.json"
    path.write_text(json.dumps({"floors": floors}))
    return str(path)


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=DEADLINE_S)


FLOOR_16M = {"group": "payload-16MiB", "pool": "shmpool-spawn", "peer": "torch-spawn", "min_speedup": 10.0}


@pytest.mark.parametrize("shm_s,torch_s,rc", [
    (0.010, 0.200, 0),  # 20x >= 10x
    (0.010, 0.100, 0),  # exactly the floor holds
    (0.050, 0.200, 1),  # 4x < 10x: must fail
])
def test_floor_against_ratio(tmp_path, shm_s, torch_s, rc):
    b = bench_json(tmp_path, {("payload-16MiB", "16MiB", "shmpool-spawn"): shm_s,
                              ("payload-16MiB", "16MiB", "torch-spawn"): torch_s})
    r = run(b, "--floors", floors_json(tmp_path, [FLOOR_16M]))
    assert r.returncode == rc, r.stdout + r.stderr
    if rc:
        assert "FAIL  payload-16MiB: shmpool-spawn vs torch-spawn: 4.00x faster" in r.stderr
        assert "floor 10x" in r.stderr


def test_missing_shmpool_result_fails(tmp_path):
    b = bench_json(tmp_path, {("payload-16MiB", "16MiB", "torch-spawn"): 0.2})
    r = run(b, "--floors", floors_json(tmp_path, [FLOOR_16M]))
    assert r.returncode == 1
    assert "no shmpool-spawn result in this run" in r.stderr


def test_missing_peer_is_skipped_but_something_must_be_checked(tmp_path):
    b = bench_json(tmp_path, {("payload-16MiB", "16MiB", "shmpool-spawn"): 0.01,
                              ("payload-16MiB", "16MiB", "ppe-spawn"): 0.2})
    ppe = dict(FLOOR_16M, peer="ppe-spawn", min_speedup=6.0)
    r = run(b, "--floors", floors_json(tmp_path, [FLOOR_16M, ppe]))
    assert r.returncode == 0, r.stderr
    assert "skip  payload-16MiB: shmpool-spawn vs torch-spawn: no torch-spawn result" in r.stdout
    assert "ok    payload-16MiB: shmpool-spawn vs ppe-spawn: 20.00x faster" in r.stdout
    r = run(b, "--floors", floors_json(tmp_path, [FLOOR_16M]))  # only the torch floor: nothing checked
    assert r.returncode == 1
    assert "no floor could be checked" in r.stderr


def test_case_selects_within_group(tmp_path):
    b = bench_json(tmp_path, {("numpy-16MiB", "ndarray", "shmpool-spawn"): 0.01,
                              ("numpy-16MiB", "bytes", "shmpool-spawn"): 0.10,
                              ("numpy-16MiB", "ndarray", "torch-spawn"): 0.15,
                              ("numpy-16MiB", "bytes", "torch-spawn"): 0.15})
    fl = {"group": "numpy-16MiB", "case": "ndarray", "pool": "shmpool-spawn", "peer": "torch-spawn", "min_speedup": 8}
    assert run(b, "--floors", floors_json(tmp_path, [fl])).returncode == 0
    assert run(b, "--floors", floors_json(tmp_path, [dict(fl, case="bytes")])).returncode == 1


def test_reads_shmpool_bench_json(tmp_path):
    doc = {"tool": "shmpool-bench", "results": [
        {"workload": "payload", "case": "16MiB", "pool": "shmpool-spawn", "median_s": 0.01},
        {"workload": "payload", "case": "16MiB", "pool": "torch-spawn", "median_s": 0.05},
        {"workload": "payload", "case": "16MiB", "pool": "ppe-spawn", "median_s": None, "status": "failed: X"}]}
    path = tmp_path / "cli.json"
    path.write_text(json.dumps(doc))
    r = run(str(path), "--floors", floors_json(tmp_path, [FLOOR_16M]))
    assert r.returncode == 1 and "5.00x faster" in r.stderr


@pytest.mark.parametrize("content", ["not json", json.dumps({"something": "else"})])
def test_unreadable_input_exits_2(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    r = run(str(path), "--floors", floors_json(tmp_path, [FLOOR_16M]))
    assert r.returncode == 2
    assert "check_bench_ratios:" in r.stderr


def test_stored_floors_file_is_valid():
    floors = json.load(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "floors.json")))["floors"]
    # every floor sits under the lowest ratio actually measured, or the check would flake
    assert floors and all(0 < f["min_speedup"] < min(f["measured"]) for f in floors)


def test_a_self_timed_median_in_extra_info_wins(tmp_path):
    """torch-warmup records the pool's start-up as extra_info median_s; pytest-benchmark's own
    median there is the whole fresh interpreter's run and must not be used."""
    doc = {"benchmarks": [
        {"group": "torch-warmup-8-workers", "name": f"test[{p}]", "extra_info": {"pool": p, "case": "ready", "median_s": m},
         "stats": {"median": 1e-6, "mean": 1e-6, "rounds": 1}}
        for p, m in (("shmpool-fork", 5.0), ("torch-spawn", 4.0))]}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(doc))
    floor = {"group": "torch-warmup-8-workers", "pool": "shmpool-fork", "peer": "torch-spawn", "min_speedup": 1.0}
    r = run(str(path), "--floors", floors_json(tmp_path, [floor]))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "0.80x faster (5000.000 ms vs 4000.000 ms)" in r.stderr

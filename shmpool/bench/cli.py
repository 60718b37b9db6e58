"""``shmpool-bench``: shmpool beside torch's SubprocPool and the stdlib pools, in one run.

    python -m shmpool.bench                      # --quick: well under a minute on 2 cores
    python -m shmpool.bench --full --json out.json --plot out.png
    python -m shmpool.bench --workload payload --sizes 1K,16M,256M --pools shmpool-spawn,torch-spawn
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import sys
import time

from shmpool.bench import measure, pools as pools_mod, report, runner, workloads

DEFAULT_REPEAT = {"quick": 3, "full": 5}

BENCH_EXTRA = 'pip install "shmpool[bench]"'
TORCH_EXTRA = 'pip install "shmpool[torch]" (install the torch CPU wheel first, see the README)'
# What an explicitly chosen workload or pool needs beyond the core. The default workload list
# skips one whose package is missing and says so in the report instead.
WORKLOAD_NEEDS = {"triton": ("triton", BENCH_EXTRA), "fx": ("torch", TORCH_EXTRA), "torch-warmup": ("torch", TORCH_EXTRA)}
POOL_NEEDS = {"torch-spawn": ("torch", TORCH_EXTRA)}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="shmpool-bench",
        description="Time shmpool's SubprocPool against torch's SubprocPool, ProcessPoolExecutor and "
                    "multiprocessing.Pool on the same jobs, in the same run.")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="small sizes, no triton (default; under a minute on 2 cores)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="1 KiB .. 1 GiB, every workload, 5 repetitions")
    ap.set_defaults(mode="quick")
    ap.add_argument("--workload", action="append", choices=workloads.WORKLOADS, metavar="NAME",
                    help=f"run only this workload (repeatable): {', '.join(workloads.WORKLOADS)}")
    ap.add_argument("--sizes", help="payload sizes, comma separated, e.g. 1K,1M,16M,1G")
    ap.add_argument("--big", help="size of the oneway/numpy/fx-weights payload (default 16M quick, 256M full)")
    ap.add_argument("--pools", help=f"comma separated subset of {','.join(pools_mod.KNOWN_POOLS)} "
                                   f"(default: all but {','.join(pools_mod.OPTIONAL_POOLS)})")
    ap.add_argument("--repeat", type=int, help="timed repetitions per case and pool (default 3 quick, 5 full)")
    ap.add_argument("--workers", type=int, default=2, help="workers per pool (default 2)")
    ap.add_argument("--json", metavar="PATH", help="write every raw figure and a machine description here")
    ap.add_argument("--plot", metavar="PATH", help="write a PNG of GB/s against payload size here")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def _config(args) -> dict:
    full = args.mode == "full"
    names = args.workload or list(workloads.WORKLOADS if full else workloads.QUICK_WORKLOADS)
    sizes = ([workloads.parse_size(s) for s in args.sizes.split(",") if s.strip()] if args.sizes
             else list(workloads.FULL_SIZES if full else workloads.QUICK_SIZES))
    big = workloads.parse_size(args.big) if args.big else (workloads.FULL_BIG if full else workloads.QUICK_BIG)
    pool_names = [p.strip() for p in args.pools.split(",")] if args.pools else list(pools_mod.ALL_POOLS)
    for p in pool_names:
        if p not in pools_mod.KNOWN_POOLS:
            raise SystemExit(f"shmpool-bench: unknown pool {p!r}; choose from {', '.join(pools_mod.KNOWN_POOLS)}")
    repeat = args.repeat or DEFAULT_REPEAT[args.mode]
    if repeat < 1 or args.workers < 1:
        raise SystemExit("shmpool-bench: --repeat and --workers must be at least 1")
    return {"mode": args.mode, "workloads": names, "sizes": sizes, "big": big, "pools": pool_names,
            "repeat": repeat, "workers": args.workers}


class _Progress:
    """tqdm on stderr when available and wanted; a no-op otherwise."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                # disable=None: a bar only on a terminal; a CI log gets the table alone
                self.bar = tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True, leave=False, disable=None)
            except ImportError:
                pass  # check_extras() stops a run that wants a bar before it gets here

    def tick(self, what: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(what[:40])
            self.bar.update(1)

    def note(self, what: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(what[:40])
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _program() -> str:
    """How this run was started, for the report: the console script or ``python -m``."""
    return "python -m shmpool.bench" if sys.argv and sys.argv[0].endswith("__main__.py") else "shmpool-bench"


def _have(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None  # None: import blocked, as if not installed
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_extras(args: argparse.Namespace) -> None:
    """Exit at once, naming the extra to install, when an option needs a package that is missing:
    before any pool starts, not after a run of minutes fails at its end."""
    needs: list[tuple[str, str, str]] = [("psutil", "the benchmark", BENCH_EXTRA)]
    if not args.no_progress:
        needs.append(("tqdm", "the progress bar (or pass --no-progress)", BENCH_EXTRA))
    if args.plot:
        needs.append(("matplotlib", "--plot", BENCH_EXTRA))
    for name in args.workload or ():
        if name in WORKLOAD_NEEDS:
            needs.append((*WORKLOAD_NEEDS[name][:1], f"--workload {name}", WORKLOAD_NEEDS[name][1]))
    for name in (p.strip() for p in (args.pools or "").split(",")):
        if name in POOL_NEEDS:
            needs.append((*POOL_NEEDS[name][:1], f"--pools {name}", POOL_NEEDS[name][1]))
    for module, what, fix in needs:
        if not _have(module):
            raise SystemExit(f"shmpool-bench: {what} needs {module}, which is not installed: {fix}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    check_extras(args)
    cfg = _config(args)
    t_start = time.perf_counter()
    pools_mod.ensure_importable_by_workers()
    # Triton reads this when a compile leaves enable_fp_fusion unset; set it so no worker warns.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

    cases = workloads.build(cfg["workloads"], cfg["sizes"], cfg["big"])
    pools = [pools_mod.PoolUnderTest(name, cfg["workers"]) for name in cfg["pools"]]
    bar = _Progress(len(pools) + runner.steps_for(cases, pools, cfg["repeat"]), not args.no_progress)
    results: list[runner.Result] = []
    try:
        for p in pools:  # start every pool up front so start-up is measured alone
            bar.note(f"starting {p.name}")
            runner.ensure_started(p)
            bar.tick(f"started {p.name}")
        for case in cases:
            results += runner.run_case(case, pools, cfg["repeat"], bar.tick)
    finally:
        bar.close()
        for p in pools:
            p.close()

    names = [p.name for p in pools]
    baseline = report.baseline_of(results, tuple(b for b in pools_mod.BASELINES if b in names))
    wall = time.perf_counter() - t_start
    print(f"shmpool-bench {cfg['mode']}: {cfg['workers']} workers per pool, {cfg['repeat']} repetitions "
          f"after a warm-up, median; cells are 'median ±half the interquartile range, speed-up over {baseline or 'nothing'}'")
    print(report.table(results, names, baseline))
    mem = report.memory_table(results, names)
    if mem:
        print()
        print(mem)
    print()
    for p in pools:
        state = (f"start-up {p.startup_s:.2f} s" if p.startup_s is not None else "")
        if p.unavailable:
            state += f" unavailable: {p.unavailable}"
        if p.restarts:
            state += f", rebuilt {p.restarts}x after failures"
        print(f"{p.name:>14}: {state.strip(', ')}")
    for r in results:
        if r.status.startswith("failed"):
            print(f"failed {r.workload} {r.case} on {r.pool}: {r.error}")
    for c in cases:
        if c.skip:
            print(f"skipped {c.workload} {c.name}: {c.skip}")
    if "triton" not in cfg["workloads"]:
        print("triton workload not run (not part of --quick); add --workload triton or use --full")
    print(f"total {wall:.1f} s")

    meta = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join([_program(), *(sys.argv[1:] if argv is None else argv)]),
            "wall_s": wall, "baseline": baseline}
    if args.json:
        pool_info = {p.name: {"startup_s": p.startup_s, "restarts": p.restarts, "unavailable": p.unavailable}
                     for p in pools}
        report.to_json(args.json, results=results, pools=pool_info, machine=measure.machine(), config=cfg, meta=meta)
        print(f"wrote {args.json}")
    if args.plot:
        m = measure.machine()
        title = (f"shmpool-bench {cfg['mode']}, {meta['date'][:10]}: {m['cpu_model']}, "
                 f"{m['cores_usable']} cores, {m['memory_total_bytes'] / 2**30:.0f} GiB")
        if report.plot(args.plot, results, names, title):
            print(f"wrote {args.plot}")
        else:
            print("no plot: the payload workload did not run")
    return 0


if __name__ == "__main__":
    sys.exit(main())

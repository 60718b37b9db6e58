"""Frozen weights through a subprocess FX compile: in-process compile, torch's pool, shmpool.

    python scripts/frozen_fx.py                              # 256 MiB (1 x 8192^2), all three
    python scripts/frozen_fx.py --model 4x8192 --modes inprocess,shmpool
    python scripts/frozen_fx.py --model 1x8192,4x4096 --json out.json
    python scripts/frozen_fx.py --model 4x16384 --modes inprocess,shmpool --reps 3

A model is fp32 ``nn.Sequential`` of LAYERS square ``Linear(WIDTH, WIDTH)`` with ReLUs between,
compiled with ``torch._inductor.config.freezing=True`` (``cpp.weight_prepack=False``, which the
subprocess path needs: prepacked mkldnn weights cannot be pickled; in-process uses the same config).
Each (model, mode) runs in a fresh process, which:

- builds the model and the input, and for a pool mode builds the FX pool torch would use and
  warms it with a trivial job (start-up is not timed);
- compiles a tiny model first, the same way (in-process, or through the pool), in every mode: the
  first compile of a process pays seconds of one-time probes and imports, in the parent and in a
  worker alike, and those belong to no floor;
- starts a sampler process reading MemTotal - MemAvailable every 20 ms (system-wide: it sees the
  worker, shared memory and page cache as well as this process); its first sample is the baseline;
- times the first compiled call ``torch.compile(model)(x)`` (empty inductor caches), and checks it
  against eager;
- for a pool, splits out IPC: pickling the job in the parent, submit to the worker starting it,
  unpickling in the worker, and the result back (to the future resolving).

Columns: wall (s), in worker (s: the job in the worker, unpickling and compile), ipc (s), peak (system-wide peak growth / weight bytes; in brackets the run's own:
the private memory (RssAnon) of this process and its children plus the machine's shared memory,
which the neighbours' jobs on a shared machine move far less), copies (shmpool: payload
bytes memcpy'd on the way in / weight bytes, from the pool's stats; torch: pickled job bytes /
weight bytes, each of them then copied several times more), sent (payload bytes / weight bytes).
The machine is shared: memory growth includes whatever else ran meanwhile.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODES = ("inprocess", "torch", "shmpool")
SAMPLE_S = 0.02
# Far past the slowest compile measured here (torch's pool at 1 GiB: ~130 s): a hang.
RUN_DEADLINE_S = 900.0
SIZES = {"256M-1x8192": "1x8192", "256M-4x4096": "4x4096", "1G": "4x8192", "2G": "4x11585", "4G": "4x16384"}

# Whole-machine ceiling for one run: this process, its workers and their shared memory together
# (weights included). Past it the sampler kills the run, which is reported as killed: the machine is
# shared, and torch's pool needs ~15x the weights at 1 GiB.
MEMORY_LIMIT_BYTES = int(10.5 * 2**30)

# The sampler: prints the peak of MemTotal - MemAvailable over its life, minus its first sample.
# Past `limit` bytes of growth it kills its parent's whole process tree (but itself) and says so.
_SAMPLER = r"""
import os, select, signal, sys
import psutil
limit = int(sys.argv[1])
me, parent = os.getpid(), psutil.Process(os.getppid())
def meminfo():
    with open("/proc/meminfo") as f:
        m = {l.split(":")[0]: int(l.split()[1]) for l in f}
    return (m["MemTotal"] - m["MemAvailable"]) * 1024, m["Shmem"] * 1024
def tree_anon():
    total = 0
    try:
        procs = [parent] + parent.children(recursive=True)
    except psutil.Error:
        return 0
    for p in procs:
        if p.pid == me:
            continue
        try:
            with open(f"/proc/{p.pid}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total
def ours():
    # this run's own memory: private memory of this process tree plus shared memory (its memfds)
    return tree_anon() + meminfo()[1]
base, own_base = meminfo()[0], ours()
peak, own_peak = base, own_base
print("ready", flush=True)
tick = 0
while not select.select([sys.stdin], [], [], %r)[0]:
    peak, tick = max(peak, meminfo()[0]), tick + 1
    if tick %% 5 == 0:  # the process tree every 100 ms: listing it costs CPU the compile needs
        own_peak = max(own_peak, ours())
    if peak - base > limit:
        for p in [parent] + parent.children(recursive=True):
            if p.pid != me:
                try:
                    p.send_signal(signal.SIGKILL)
                except psutil.Error:
                    pass
        print("killed", peak - base, file=sys.stderr, flush=True)
        sys.exit(3)
peak, own_peak = max(peak, meminfo()[0]), max(own_peak, ours())
print(peak - base, own_peak - own_base, flush=True)
""" % SAMPLE_S


@dataclasses.dataclass
class Run:
    model: str
    mode: str
    weight_bytes: int
    wall_s: float = 0.0
    ipc_s: float | None = None
    serialize_s: float | None = None
    to_worker_s: float | None = None
    deserialize_s: float | None = None
    in_worker_s: float | None = None  # the job in the worker, its unpickling included
    from_worker_s: float | None = None
    peak_growth_bytes: int = 0
    own_peak_growth_bytes: int = 0  # this run's processes' private memory plus shared memory
    sent_bytes: int | None = None
    copied_bytes: int | None = None
    max_abs_err: float = 0.0
    error: str | None = None

    @property
    def peak_x(self) -> float:
        return self.peak_growth_bytes / self.weight_bytes

    @property
    def own_peak_x(self) -> float:
        return self.own_peak_growth_bytes / self.weight_bytes


def _now() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)  # one clock across processes on Linux


def build_model(spec: str) -> tuple[Any, Any]:
    import torch

    layers, width = (int(v) for v in spec.split("x"))
    torch.manual_seed(0)
    mods: list[Any] = []
    with torch.no_grad():
        for i in range(layers):
            lin = torch.nn.Linear(width, width, bias=True)
            # Small weights keep the activations finite through many layers; init is not timed.
            lin.weight.normal_(0.0, 1.0 / width**0.5)
            mods += [lin, torch.nn.ReLU()] if i < layers - 1 else [lin]
    return torch.nn.Sequential(*mods).eval(), torch.randn(2, width)


def warm_worker() -> int:
    """Runs in the worker before timing: import what unpickling an FX job imports (inductor's
    compile_fx and the FX-job classes), as a worker that has served a compile already has."""
    import importlib

    for name in ("torch._inductor.compile_fx", "torch._inductor.compile_fx_ext", "torch._inductor.compile_fx_subproc"):
        importlib.import_module(name)
    return os.getpid()


def warm_compile(mode: str) -> None:
    """One tiny compile the way the timed one will go (in this process, or through the pool),
    so that neither side's first-compile costs (the C++ toolchain and vector-ISA probes, lazy
    imports: seconds here) land in the figure. Every mode gets it."""
    import torch

    import shmpool.torch

    # A ReLU between two layers, as in the measured models: it makes a C++ kernel, so the
    # C++ toolchain is probed and used here, not in the timed compile.
    tiny = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8)).eval()
    with torch.no_grad():
        if mode == "inprocess":
            torch.compile(tiny)(torch.randn(2, 8))
        else:
            with shmpool.torch.subprocess_fx_compile():
                torch.compile(tiny)(torch.randn(2, 8))
    shmpool.torch.clear_fx_compile_counts()


def timed_fx_job(fn: Any, pickled_input: Any, extra_env: Any) -> tuple[Any, float, float, float]:
    """Runs in the worker: torch's FX job, with its input's unpickling timed."""
    inner = pickled_input.deserialize

    def deserialize() -> Any:
        t = _now()
        out = inner()
        spans.append(_now() - t)
        return out

    spans: list[float] = []
    pickled_input.deserialize = deserialize
    start = _now()
    result = fn(pickled_input, extra_env)
    return result, start, _now(), spans[0] if spans else 0.0


def _instrument(pool: Any, rec: dict[str, float]) -> None:
    """Time the parent's pickling of the FX job and the job's trip through ``pool``."""
    from concurrent.futures import Future

    from shmpool import _torch_compat

    cls = _torch_compat.fx_wire_classes()[0]  # _WireProtocolInput
    serialize = cls.serialize

    def timed_serialize(self: Any) -> Any:
        t = _now()
        out = serialize(self)
        rec["serialize"] = _now() - t
        rec["sent"] = len(out.value) + sum(memoryview(b).nbytes for b in getattr(out, "buffers", ()))
        return out

    cls.serialize = timed_serialize
    inner_submit = pool.submit

    def submit(fn: Any, *args: Any) -> Future[Any]:
        import frozen_fx  # by name: the worker cannot import a script's __main__

        rec["submit"] = _now()
        outer: Future[Any] = Future()

        def done(f: Future[Any]) -> None:
            rec["resolved"] = _now()
            try:
                result, rec["start"], rec["end"], rec["deserialize"] = f.result()
            except BaseException as e:  # noqa: BLE001 - handed on to the caller
                outer.set_exception(e)
                return
            outer.set_result(result)

        inner_submit(frozen_fx.timed_fx_job, fn, *args).add_done_callback(done)
        return outer

    pool.submit = submit


def run_one(spec: str, mode: str) -> Run:
    """One configuration, in this (fresh) process."""
    cache = tempfile.mkdtemp(prefix="frozen-fx-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    os.environ["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")
    import torch
    import torch._inductor.config as cfg

    import shmpool.torch

    cfg.freezing = True
    cfg.cpp.weight_prepack = False
    cfg.compile_threads = 1  # no async kernel pool: on CPU it would only run a no-op
    model, x = build_model(spec)
    weights = sum(p.untyped_storage().nbytes() for p in model.parameters())
    run = Run(spec, mode, weights)
    rec: dict[str, float] = {}
    pool = None
    if mode != "inprocess":
        if mode == "shmpool":
            shmpool.torch.install()
        pool = shmpool.torch.fx_process_pool()
        import frozen_fx

        pool.submit(frozen_fx.warm_worker).result(timeout=RUN_DEADLINE_S)  # started
    warm_compile(mode)  # and ready: a first compile's one-time costs are nobody's floor
    if pool is not None:
        _instrument(pool, rec)
    with torch.no_grad():
        expected = model(x)
    before = pool.stats() if mode == "shmpool" else None
    limit = MEMORY_LIMIT_BYTES - weights
    sampler = subprocess.Popen([sys.executable, "-c", _SAMPLER, str(limit)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True)
    assert sampler.stdout is not None and sampler.stdin is not None
    sampler.stdout.readline()
    try:
        with torch.no_grad():
            if mode == "inprocess":
                t = time.perf_counter()
                out = torch.compile(model)(x)
            else:
                with shmpool.torch.subprocess_fx_compile():
                    t = time.perf_counter()
                    out = torch.compile(model)(x)
            run.wall_s = time.perf_counter() - t
    finally:
        sampler.stdin.close()
        run.peak_growth_bytes, run.own_peak_growth_bytes = (int(v) for v in sampler.stdout.readline().split())
        sampler.wait()
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)
    run.max_abs_err = float((out - expected).abs().max())
    counts = shmpool.torch.fx_compile_counts()
    if mode != "inprocess":
        if counts.get("_InProcessFxCompile", 0) or counts.get("_SubprocessFxCompile", 0) != 1:
            raise RuntimeError(f"expected one subprocess compile, saw {counts}")
        run.serialize_s = rec["serialize"]
        run.to_worker_s = rec["start"] - rec["submit"]
        run.deserialize_s = rec["deserialize"]
        run.in_worker_s = rec["end"] - rec["start"]
        run.from_worker_s = rec["resolved"] - rec["end"]
        run.ipc_s = run.serialize_s + run.to_worker_s + run.deserialize_s + run.from_worker_s
        run.sent_bytes = int(rec["sent"])
    if before is not None:
        after = pool.stats()  # type: ignore[union-attr]
        run.copied_bytes = after.copied_to_workers - before.copied_to_workers
        run.sent_bytes = after.bytes_to_workers - before.bytes_to_workers
    return run


def spawn_one(spec: str, mode: str) -> Run:
    """Run one configuration in a fresh interpreter; a crash or a kill becomes Run.error."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "scripts"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-c", f"import frozen_fx, json, dataclasses; "
           f"print('RESULT', json.dumps(dataclasses.asdict(frozen_fx.run_one({spec!r}, {mode!r}))))"]
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=RUN_DEADLINE_S)
    except subprocess.TimeoutExpired:
        return Run(spec, mode, 0, error=f"no result in {RUN_DEADLINE_S:.0f} s")
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return Run(**json.loads(line[len("RESULT "):]))
    killed = [line for line in proc.stderr.splitlines() if line.startswith("killed ")]
    if killed:
        growth = int(killed[-1].split()[1])
        return Run(spec, mode, 0, error=f"killed at {growth / 2**30:.1f} GiB growth (limit {MEMORY_LIMIT_BYTES / 2**30:.1f} GiB in all)")
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return Run(spec, mode, 0, error=f"exit {proc.returncode}: {' | '.join(tail)}")


def _fmt(v: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


def table(runs: list[Run]) -> str:
    lines = ["| model | weights | mode | wall s | in worker s | IPC s (pickle / to worker / unpickle / back) | peak growth (own) | copies in | sent |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        if r.error:
            lines.append(f"| {r.model} | | {r.mode} | failed: {r.error} | | | | | |")
            continue
        ipc = "-" if r.ipc_s is None else (
            f"{r.ipc_s:.2f} ({r.serialize_s:.2f} / {r.to_worker_s:.2f} / {r.deserialize_s:.2f} / {r.from_worker_s:.2f})")
        copies = None if r.copied_bytes is None else r.copied_bytes / r.weight_bytes
        sent = None if r.sent_bytes is None else r.sent_bytes / r.weight_bytes
        lines.append(f"| {r.model} | {r.weight_bytes / 2**20:.0f} MiB | {r.mode} | {r.wall_s:.1f} | {_fmt(r.in_worker_s, '.2f')} | {ipc} | "
                     f"{r.peak_x:.1f}x ({r.own_peak_x:.1f}x) | {_fmt(copies, '.2f', 'x')} | {_fmt(sent, '.2f', 'x')} |")
    return "\n".join(lines)


def medians(runs: list[Run]) -> list[Run]:
    """One Run per (model, mode): the median wall time's run (failed runs kept if all failed)."""
    out = []
    for key in dict.fromkeys((r.model, r.mode) for r in runs):
        group = [r for r in runs if (r.model, r.mode) == key]
        ok = sorted((r for r in group if not r.error), key=lambda r: r.wall_s)
        out.append(ok[(len(ok) - 1) // 2] if ok else group[-1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="1x8192", help="LAYERSxWIDTH, comma separated (default 1x8192: 256 MiB)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma separated subset of {','.join(MODES)}")
    ap.add_argument("--reps", type=int, default=1,
                    help="runs of each configuration, the order of the modes rotating each time (default 1)")
    ap.add_argument("--json", metavar="PATH", help="append every run, one JSON object a line")
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",")]
    for mode in modes:
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    runs = []
    for spec in args.model.split(","):
        for rep in range(args.reps):
            for mode in modes[rep % len(modes):] + modes[: rep % len(modes)]:
                run = spawn_one(spec.strip(), mode)
                runs.append(run)
                print(table([run]).splitlines()[-1], flush=True)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(dataclasses.asdict(run)) + "\n")
    print()
    print(table(medians(runs) if args.reps > 1 else runs))
    if args.reps > 1:
        print(f"(the run with the median wall time of {args.reps} per row)")


if __name__ == "__main__":
    main()

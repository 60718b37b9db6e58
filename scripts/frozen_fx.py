"""Frozen weights through a subprocess FX compile: in-process compile, torch's pool, shmpool.

    python scripts/frozen_fx.py                              # 256 MiB (1 x 8192^2), all three
    python scripts/frozen_fx.py --model 4x8192 --modes inprocess,shmpool
    python scripts/frozen_fx.py --model 1x8192,4x4096 --json out.json

A model is fp32 ``nn.Sequential`` of LAYERS square ``Linear(WIDTH, WIDTH)`` with ReLUs between,
compiled with ``torch._inductor.config.freezing=True`` (``cpp.weight_prepack=False``, which the
subprocess path needs: prepacked mkldnn weights cannot be pickled; in-process uses the same config).
Each (model, mode) runs in a fresh process, which:

- builds the model and the input, and for a pool mode builds the FX pool torch would use and
  warms it with a trivial job (start-up is not timed);
- starts a sampler process reading MemTotal - MemAvailable every 20 ms (system-wide: it sees the
  worker, shared memory and page cache as well as this process); its first sample is the baseline;
- times the first compiled call ``torch.compile(model)(x)`` (empty inductor caches), and checks it
  against eager;
- for a pool, splits out IPC: pickling the job in the parent, submit to the worker starting it,
  unpickling in the worker, and the result back (to the future resolving).

Columns: wall (s), ipc (s), peak (system-wide peak growth / weight bytes), copies (shmpool: payload
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
def used():
    with open("/proc/meminfo") as f:
        m = {l.split(":")[0]: int(l.split()[1]) for l in f}
    return (m["MemTotal"] - m["MemAvailable"]) * 1024
base = peak = used()
print("ready", flush=True)
while not select.select([sys.stdin], [], [], %r)[0]:
    peak = max(peak, used())
    if peak - base > limit:
        parent = psutil.Process(os.getppid())
        for p in [parent] + parent.children(recursive=True):
            if p.pid != os.getpid():
                try:
                    p.send_signal(signal.SIGKILL)
                except psutil.Error:
                    pass
        print("killed", peak - base, file=sys.stderr, flush=True)
        sys.exit(3)
peak = max(peak, used())
print(peak - base, flush=True)
""" % SAMPLE_S
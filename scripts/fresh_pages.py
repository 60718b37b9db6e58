"""What filling fresh memory costs here: anonymous huge pages against a fresh memfd, alternated.

    python scripts/fresh_pages.py            # 2 GiB, 3 rounds
    python scripts/fresh_pages.py --gib 4 --rounds 2 --memfd-first

Each round copies the same source into fresh anonymous memory (``MADV_HUGEPAGE``, as a receiver's
big ``bytes`` gets) and then into a fresh memfd through ``pwrite`` (as shmpool fills a one-off
segment), and frees both (``--memfd-first``: the other way round). On a VM whose host takes back guest memory that was freed, the first
allocation of a round pays for the host backing it again, whichever kind it is; an allocation
right after a free reuses backed memory. That is the cost a first big payload meets, and no
transport that gives the receiver pages of its own avoids it (README, frozen weights).
"""
from __future__ import annotations

import argparse
import mmap
import os
import time

STEP = 64 << 20


def into_anonymous(src: memoryview) -> float:
    t0 = time.perf_counter()
    m = mmap.mmap(-1, src.nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_HUGEPAGE)
    view = memoryview(m)
    for off in range(0, src.nbytes, STEP):
        view[off : off + STEP] = src[off : off + STEP]
    elapsed = time.perf_counter() - t0
    view.release()
    m.close()
    return elapsed


def into_memfd(src: memoryview) -> float:
    t0 = time.perf_counter()
    fd = os.memfd_create("fresh-pages")
    try:
        os.ftruncate(fd, src.nbytes)
        off = 0
        while off < src.nbytes:
            off += os.pwrite(fd, src[off : off + STEP], off)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=2.0, help="bytes to copy each time, in GiB (default 2)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--memfd-first", action="store_true", help="fill the memfd first in each round")
    args = ap.parse_args()
    size = int(args.gib * (1 << 30))
    src = bytearray(size)
    for i in range(0, size, 4096):  # back every source page before timing
        src[i] = 1
    view = memoryview(src)
    print("round | anonymous huge pages s/GiB | fresh memfd (pwrite) s/GiB")
    for r in range(1, args.rounds + 1):
        if args.memfd_first:
            shm = into_memfd(view) / args.gib
            anon = into_anonymous(view) / args.gib
        else:
            anon = into_anonymous(view) / args.gib
            shm = into_memfd(view) / args.gib
        print(f"{r} | {anon:.2f} | {shm:.2f}", flush=True)


if __name__ == "__main__":
    main()

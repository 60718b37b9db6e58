"""shmpool's benchmark: ``python -m shmpool.bench`` (or ``shmpool-bench``) and helpers for ``bench/``.

Nothing here is imported by ``import shmpool``; torch, numpy, matplotlib and tqdm are
imported only by the workloads and reports that need them.
"""

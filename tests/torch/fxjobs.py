"""Jobs the frozen-weight tests run in the FX worker, to look at what a compile left behind."""

from __future__ import annotations

import gc


def live_tensors(min_numel: int) -> list[tuple[str, tuple[int, ...]]]:
    """Real tensors of at least min_numel elements still alive in this process."""
    import torch

    gc.collect()
    found = []
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and type(obj).__name__ != "FakeTensor" and not obj.is_meta:
            if obj.numel() >= min_numel:
                found.append((type(obj).__name__, tuple(obj.shape)))
    return found


def shared_mappings() -> list[str]:
    """This process's memfd mappings: its two rings, plus any one-off payload still mapped."""
    with open("/proc/self/maps") as f:
        return [line.split()[-2] if line.rstrip().endswith("(deleted)") else line.split()[-1] for line in f if "memfd:" in line]

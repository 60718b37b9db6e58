"""Imported by the fork helper of a pool torch builds (``preload=``), before its first fork.

The helper takes module names only, so this module's import is the set-up: see
``_torch_compat.prepare_fork_helper``. Nothing else should import it.
"""
from shmpool import _torch_compat

_torch_compat.prepare_fork_helper()

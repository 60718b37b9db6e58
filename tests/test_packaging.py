"""The package boundary: what `pip install shmpool` pulls, what `import shmpool` imports, what
ships, and the benchmark's extras failing at once by name."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# A fresh interpreter importing shmpool: well under a second; the bench CLI refusing an option
# must not get as far as starting a pool (seconds).
SUBPROCESS_DEADLINE_S = 60.0
REFUSE_WITHIN_S = 10.0


def _requirement_names(reqs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in reqs}


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=SUBPROCESS_DEADLINE_S)


def test_core_install_pulls_only_what_the_core_imports() -> None:
    assert _requirement_names(PYPROJECT["project"]["dependencies"]) == {"cloudpickle", "numpy"}


def test_extras() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert "torch>=2.13,<2.15" in extras["torch"]  # what tests/torch has been run against
    assert "triton" in _requirement_names(extras["torch"]) & _requirement_names(extras["bench"])
    assert "pytest-benchmark" in _requirement_names(extras["bench"]) & _requirement_names(extras["test"])
    assert {"matplotlib", "psutil", "tqdm"} <= _requirement_names(extras["bench"])


def test_torch_extra_matches_what_torch_compat_names() -> None:
    # Read as text: shmpool._torch_compat imports torch.
    compat = (REPO / "shmpool" / "_torch_compat.py").read_text()
    assert 'SUPPORTED_TORCH = ">=2.13,<2.15"' in compat
    assert "torch>=2.13,<2.15" in PYPROJECT["project"]["optional-dependencies"]["torch"]


def test_ships_py_typed() -> None:
    assert (REPO / "shmpool" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["shmpool"]


def test_core_imports_no_benchmark_or_torch_package() -> None:
    # shmpool.ray is left out: it is the `ray` extra, and ray itself imports psutil and tqdm.
    r = _run_python("""
        import sys, pkgutil, importlib, shmpool
        core = [m.name for m in pkgutil.iter_modules(shmpool.__path__, "shmpool.")
                if not m.name.startswith(("shmpool.bench", "shmpool.torch", "shmpool._torch", "shmpool.ray"))]
        for name in core:
            importlib.import_module(name)
        heavy = ("torch", "triton", "pytest_benchmark", "matplotlib", "psutil", "tqdm", "loky")
        print(sorted(core))
        assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]
    """)
    assert r.returncode == 0, r.stderr
    assert "shmpool.pool" in r.stdout


def test_benchmark_code_is_out_of_the_core_package() -> None:
    assert not (REPO / "shmpool" / "triton_batch.py").exists()
    assert (REPO / "shmpool" / "bench" / "triton_batch.py").is_file()
    assert "def timed_call" not in (REPO / "shmpool" / "torch.py").read_text()
    r = _run_python("from shmpool.bench.jobs import timed_call; print(timed_call(divmod, 7, 2)[0])")
    assert r.returncode == 0 and r.stdout.strip() == "(3, 1)", r.stderr


def test_no_machine_specific_paths_in_the_package() -> None:
    for path in (REPO / "shmpool").rglob("*.py"):
        assert "/work/" not in path.read_text(), path


# (option, module made unimportable, what the message must name)
MISSING_EXTRA = [
    (["--plot", "out.png", "--no-progress"], "matplotlib", 'pip install "shmpool[bench]"'),
    (["--no-progress"], "psutil", 'pip install "shmpool[bench]"'),
    ([], "tqdm", 'pip install "shmpool[bench]"'),
    (["--workload", "triton", "--no-progress"], "triton", 'pip install "shmpool[bench]"'),
    (["--workload", "fx", "--no-progress"], "torch", 'pip install "shmpool[torch]"'),
    (["--workload", "torch-warmup", "--no-progress"], "torch", 'pip install "shmpool[torch]"'),
    (["--pools", "shmpool-spawn,torch-spawn", "--no-progress"], "torch", 'pip install "shmpool[torch]"'),
]


@pytest.mark.parametrize(("args", "module", "fix"), MISSING_EXTRA, ids=[f"{m}:{' '.join(a) or 'default'}" for a, m, _ in MISSING_EXTRA])
def test_bench_option_without_its_extra_fails_at_once(args: list[str], module: str, fix: str, tmp_path: Path) -> None:
    args = [str(tmp_path / a) if a == "out.png" else a for a in args]
    # sys.modules[name] = None makes `import name` fail as if it were not installed.
    code = f"""
        import sys
        sys.modules[{module!r}] = None
        from shmpool.bench.cli import main
        sys.exit(main({args!r}))
    """
    t0 = time.monotonic()
    r = _run_python(code)
    elapsed = time.monotonic() - t0
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert module in r.stderr and fix in r.stderr, r.stderr
    assert r.stdout == ""  # nothing ran: no table, no pool start-up lines
    assert elapsed < REFUSE_WITHIN_S
    assert not (tmp_path / "out.png").exists()

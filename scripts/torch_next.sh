#!/usr/bin/env bash
# Run tests/torch against the newest torch the torch extra admits, in a throwaway venv.
#
#   scripts/torch_next.sh                      # torch 2.14.1, venv made and removed
#   scripts/torch_next.sh --keep /tmp/tn -x    # keep (or reuse) the venv at /tmp/tn; -x goes to pytest
#   TORCH_NEXT_VERSION=2.14.0 scripts/torch_next.sh
#
# The 2.14.1 wheel on PyPI is a CUDA build: the first install pulls several GB of nvidia-*
# wheels, so expect minutes and ~10 GB of disk. The machine's own Python and its torch are not
# touched. Exit status: pytest's.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
version=${TORCH_NEXT_VERSION:-2.14.1}
python=${PYTHON:-python3}
keep=""
if [ "${1:-}" = "--keep" ]; then
  keep=$2
  shift 2
fi

if [ -n "$keep" ]; then
  venv=$keep
else
  venv=$(mktemp -d /tmp/shmpool-torch-next.XXXXXX)/venv
  trap 'rm -rf "$(dirname "$venv")"' EXIT
fi

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
have=$("$venv/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
if [ "${have%%+*}" != "$version" ]; then
  echo "== installing torch==$version into $venv"
  "$venv/bin/pip" install "torch==$version"
fi
# The torch extra's range must admit $version: if it did not, this line would replace it.
"$venv/bin/pip" install -e "$repo[test,torch]"
got=$("$venv/bin/python" -c 'import torch; print(torch.__version__)')
if [ "${got%%+*}" != "$version" ]; then
  echo "installing shmpool[torch] changed torch $version to $got: widen the torch extra" >&2
  exit 2
fi
echo "== tests/torch on torch $got ($("$venv/bin/python" -c 'import triton; print("triton", triton.__version__)' 2>/dev/null || echo 'no triton'))"
# -p no:cacheprovider: leave the worktree's .pytest_cache to the machine's own runs.
exec "$venv/bin/python" -m pytest tests/torch -p no:cacheprovider "$@"

# Sourced by scripts/serve and scripts/test: makes .venv with the project installed, once.
# FLOWORACLE_TORCH overrides the torch requirement (default: the CPU build pinned below; on a GPU
# machine use e.g. FLOWORACLE_TORCH="torch" to get PyPI's CUDA build).
set -euo pipefail
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${FLOWORACLE_TORCH:-torch==2.13.0}
extras=${1:-server}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=".venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-12)-${extras//,/_}"
if [ ! -f "$stamp" ]; then
    echo "setting up .venv (extras: $extras, $TORCH_SPEC)" >&2
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q "$TORCH_SPEC"
    .venv/bin/python -m pip install -q -e ".[$extras]"
    touch "$stamp"
fi

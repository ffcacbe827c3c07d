#!/usr/bin/env bash
# Create .venv and install Mini LLM with the UI and dev extras.
# torch goes in first, pinned to the CPU build this machine kind keeps on disk: left to pip,
# a bare `torch` requirement resolves to a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
fi
.venv/bin/python -m pip install --quiet -e ".[ui,dev]"

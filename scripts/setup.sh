#!/usr/bin/env bash
# Create .venv and install Mini LLM with the UI, export, serve, logs, data and dev extras (skipped when already
# up to date).
# torch goes in first, pinned to the CPU build this machine kind keeps on disk: left to pip, a bare
# `torch` requirement resolves to a multi-GB CUDA build. Elsewhere set TORCH_VERSION or preinstall torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
stamp=.venv/.minillm-installed
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then exit 0; fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "Installing torch ${TORCH_VERSION:-2.13.0} (CPU build) into .venv ..."
    .venv/bin/python -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}" 2> >(grep -v "is ignored: it is neither" >&2)
fi
echo "Installing mini-llm with the ui, export, serve, logs, data and dev extras into .venv ..."
.venv/bin/python -m pip install --quiet -e ".[ui,export,serve,logs,data,dev]" 2> >(grep -v -e "is ignored: it is neither" >&2)
touch "$stamp"

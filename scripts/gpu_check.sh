#!/usr/bin/env bash
# The GPU check, prepared for a machine with one CUDA GPU (about 5 minutes): training-step speed against
# the nanoGPT-style reference at nanoGPT's Shakespeare GPU shape (bf16; without and with torch.compile),
# generation speed with the engine's compiled fast path (CUDA graphs), its eager path and full recompute,
# and a short real training with the gpu preset (CUDA, bf16, compile). Run from the repository root:
#   bash scripts/gpu_check.sh            (PY=... picks the Python; the package need not be installed)
# Not yet run on a GPU: no session that wrote it had one.
set -euo pipefail
PY=${PY:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU here'; print(torch.cuda.get_device_name())"
"$PY" bench/train_step.py --device cuda --repeats 5
"$PY" bench/train_step.py --device cuda --repeats 5 --compile
"$PY" bench/generation.py --device cuda --repeats 3
out=$(mktemp -d)
"$PY" -m minillm train --preset gpu --device cuda --compile --max-time 60 --out "$out/run"
"$PY" -m minillm generate "$out/run" --prompt "ROMEO:" --max-new-tokens 100 --seed 0 --device cuda --compile

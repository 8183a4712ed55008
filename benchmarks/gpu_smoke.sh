#!/usr/bin/env bash
# GPU check (under 5 minutes): pre-train and fine-tune a few steps with trainer=gpu, print throughput and memory.
# On a GPU box with liverfusion installed: bash benchmarks/gpu_smoke.sh
# With wheels carried in .whl/ (a bare GPU image): they are installed into /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && ! python3 -c "import hydra, monai, torchdata" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} WANDB_MODE=disabled PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 benchmarks/gpu_smoke.py

#!/usr/bin/env bash
# The prepared GPU check (issues 5 and 9), for a single-GPU machine with PyTorch but without network access.
# Wheels for what its image lacks (deepspeed and its pure-Python needs, webdataset, wids, braceexpand)
# are taken from ./.whl when present. Results go to $OUT (or ./gpu_check_out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 DS_BUILD_OPS=0
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
# models import the LIF op's compiled CPU kernels; a bare checkout has to build them first (needs g++).
python3 -c "import deepspike_ops" 2>/dev/null || python3 models/csrc/build.py >"$OUT/build_ops.txt" 2>&1 \
  || { tail "$OUT/build_ops.txt"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 480 python3 -m bench.gpu_check --steps 10 --json "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.txt"

#!/usr/bin/env bash
# The prepared GPU check (issues 5, 9 and 11) for one H200-class GPU, 8 minutes in all with these install
# steps, on a machine with PyTorch but without network access:
#     bash bench/gpu_check.sh [OUT]                  # OUT defaults to $OUT, then ./gpu_check_out
#     bash bench/gpu_check.sh --cpu-dry-run [OUT]    # the same sequence at toy sizes on the CPU, < 5 min
# Writes OUT/gpu_check.json (every stage's result or failure), OUT/gpu_check.log (progress per stage and all
# output) and OUT/ray_logs/. The stages and their timeouts: bench/gpu_check.py. GPU_CHECK_BUDGET_S=SECONDS
# replaces the total time budget (a loaded machine). Wheels for what the box's image lacks (deepspeed and
# its pure-Python needs, webdataset, wids, braceexpand; ray[train], mlflow or pytest if absent) are taken
# from ./.whl when present.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=() OUT_ARG=""
for arg in "$@"; do
  case $arg in
    --cpu-dry-run) DRY=(--cpu-dry-run) ;;
    -h|--help) sed -n 2,10p "$0"; exit 0 ;;
    -*) echo "unknown option $arg (see --help)" >&2; exit 2 ;;
    *) OUT_ARG=$arg ;;
  esac
done
OUT=${OUT_ARG:-${OUT:-gpu_check_out}}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
# Seconds for everything, inside the 5 and 8 minutes; GPU_CHECK_BUDGET_S stretches it on a loaded machine.
TOTAL=${GPU_CHECK_BUDGET_S:-$([ ${#DRY[@]} -gt 0 ] && echo 290 || echo 470)}
echo "[gpu_check.sh] $(date -u +%FT%TZ) ${DRY[*]:-gpu} -> $OUT"
export PYTHONUNBUFFERED=1 DS_BUILD_OPS=0
# The checkout's venv where there is one (this CPU machine), else the box's Python.
PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then
  PY=.venv/bin/python
fi
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
# models import the LIF op's compiled CPU kernels; a bare box has to build them first (needs g++). The check
# imports torch first: without libtorch loaded the extension never imports, and it would be rebuilt every run.
# build.py builds the JPEG window decoder second; a box without libjpeg's headers keeps the LIF op and runs
# the Ray stage with data.window_decode=false (bench/gpu_check_ray.py).
if ! "$PY" -c "import torch, deepspike_ops" 2>/dev/null; then
  "$PY" models/csrc/build.py >"$OUT/build_ops.txt" 2>&1
  "$PY" -c "import torch, deepspike_ops" || { tail "$OUT/build_ops.txt"; exit 1; }
fi
if [ ${#DRY[@]} -eq 0 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
fi
echo "[gpu_check.sh] install steps took ${SECONDS} s"
LEFT=$((TOTAL - SECONDS))
exec timeout --kill-after=20 $((LEFT + 30)) "$PY" -m bench.gpu_check --out "$OUT" --budget-s "$LEFT" "${DRY[@]}"

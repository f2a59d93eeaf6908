#!/usr/bin/env bash
# The prepared GPU check for one H100/H200 on a machine with PyTorch and no network: 6 minutes in all, the
# offline install and the op build included.
#     bash bench/gpu_check.sh --bundle DIR           # here, with network: the wheel bundle for the GPU machine
#                                                    # (Python 3.12; GPU_CHECK_PYTHON_VERSION changes it)
#     bash bench/gpu_check.sh [OUT]                  # there: installs ./gpu_bundle (GPU_CHECK_BUNDLE=DIR) with
#                                                    # pip --no-index, builds the ops, runs the stages
#     bash bench/gpu_check.sh --cpu-dry-run [OUT]    # every stage at toy sizes on the CPU, in this venv
#     bash bench/gpu_check.sh --rehearse [OUT]       # the GPU machine's path on the CPU: a bundle for this
#                                                    # Python, a fresh venv with only the GPU machine's packages,
#                                                    # the offline install, the op build, the dry-run stages
# OUT defaults to $OUT, then ./gpu_check_out. Writes OUT/gpu_check.json (every stage's result or failure and
# every version), OUT/gpu_check.log (progress per stage and all output), OUT/install.txt, OUT/build_ops.txt.
# The stages, their order and timeouts: bench/gpu_check/run.py. GPU_CHECK_BUDGET_S=SECONDS replaces the time
# budget of the stages (a loaded machine).
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=gpu OUT_ARG="" BUNDLE_OUT=""
while [ $# -gt 0 ]; do
  case $1 in
    --cpu-dry-run) MODE=dry ;;
    --rehearse) MODE=rehearse ;;
    --bundle) MODE=bundle; BUNDLE_OUT=${2:?--bundle needs a folder}; shift ;;
    -h|--help) sed -n 2,15p "$0"; exit 0 ;;
    -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    *) OUT_ARG=$1 ;;
  esac
  shift
done
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The checkout's venv where there is one (this CPU machine), else the machine's Python.
PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then
  PY=.venv/bin/python
fi
if [ $MODE = bundle ]; then
  exec env PYTHONPATH="$PWD" "$PY" -m bench.gpu_check.bundle build "$BUNDLE_OUT" \
    --python-version "${GPU_CHECK_PYTHON_VERSION:-3.12}"
fi
OUT=${OUT_ARG:-${OUT:-gpu_check_out}}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
echo "[gpu_check.sh] $(date -u +%FT%TZ) $MODE -> $OUT"
BUNDLE=${GPU_CHECK_BUNDLE:-gpu_bundle}
if [ $MODE = rehearse ]; then
  # The bundle and the stand-in for the GPU machine, both made here; everything after is the GPU path.
  R="$OUT/rehearsal"
  BUNDLE="$R/bundle"
  T0=$SECONDS
  PYTHONPATH="$PWD" "$PY" -m bench.gpu_check.bundle build "$BUNDLE" \
    --python-version "$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" || exit 1
  echo "[gpu_check.sh] rehearsal: bundle built in $((SECONDS - T0)) s"
  T0=$SECONDS
  PY=$(PYTHONPATH="$PWD" "$PY" -m bench.gpu_check.bundle machine-venv "$R/venv") || exit 1
  echo "[gpu_check.sh] rehearsal: the GPU machine's packages in $R/venv ($((SECONDS - T0)) s)"
  SECONDS=0  # the 6 minutes start here, as on the GPU machine
fi
export PYTHONPATH=$PWD
if [ $MODE != dry ] && ! "$PY" -c "import deepspeed" 2>/dev/null; then
  [ -f "$BUNDLE/requirements.txt" ] || {
    echo "no deepspeed and no bundle in $BUNDLE: make one with bash bench/gpu_check.sh --bundle $BUNDLE"; exit 1; }
  # Into the machine's own Python (a throwaway machine; PEP 668 images refuse without the variable), pip
  # resolving against what is preinstalled there, from the bundle alone: no index, no pip.conf find-links.
  # The preinstalled packages are pinned to what the machine has: pip fails rather than replace its torch.
  export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_CONFIG_FILE=/dev/null
  unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL
  "$PY" -m bench.gpu_check.bundle pins >"$OUT/preinstalled.txt" || exit 1
  { "$PY" -m pip install --no-index --no-compile --find-links "$BUNDLE" -c "$OUT/preinstalled.txt" \
      -r "$BUNDLE/requirements.txt" \
    && "$PY" -m pip install --no-index --no-compile --find-links "$BUNDLE" --no-deps -r "$BUNDLE/no-deps.txt"; } \
    >"$OUT/install.txt" 2>&1 || { tail -20 "$OUT/install.txt"; exit 1; }
  echo "[gpu_check.sh] installed the bundle ($(ls "$BUNDLE"/*.whl | wc -l) wheels) in ${SECONDS} s"
fi
# models import the LIF op's compiled CPU kernels: built here against the torch this machine has. The check
# imports torch first: without libtorch loaded the extension never imports, and it would be rebuilt every run.
# build.py builds the JPEG window decoder second; a machine without libjpeg's headers keeps the LIF op and the
# stages run with data.window_decode=false (bench/gpu_check/train.py).
if ! "$PY" -c "import torch, deepspike_ops" 2>/dev/null; then
  MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" models/csrc/build.py >"$OUT/build_ops.txt" 2>&1
  "$PY" -c "import torch, deepspike_ops" || { tail "$OUT/build_ops.txt"; exit 1; }
  echo "[gpu_check.sh] built the compiled ops against torch $("$PY" -c 'import torch; print(torch.__version__)')"
fi
if [ $MODE = gpu ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
fi
echo "[gpu_check.sh] install steps took ${SECONDS} s"
# Seconds for the stages: the 6 minutes less the install steps (GPU); the dry runs' own total.
if [ $MODE = gpu ]; then LEFT=$((350 - SECONDS)); else LEFT=${GPU_CHECK_BUDGET_S:-0}; fi
[ $MODE = gpu ] && [ -n "${GPU_CHECK_BUDGET_S:-}" ] && LEFT=$GPU_CHECK_BUDGET_S
DRY=() BUDGET=()
[ $MODE != gpu ] && DRY=(--cpu-dry-run)
[ "$LEFT" -gt 0 ] && BUDGET=(--budget-s "$LEFT")
exec timeout --kill-after=20 $((${LEFT:-0} > 0 ? LEFT + 30 : 3600)) "$PY" -m bench.gpu_check.run --out "$OUT" \
  "${BUDGET[@]}" "${DRY[@]}"

#!/usr/bin/env bash
# Every GPU check of issue 12, on one H100/H200, in one call (about 4 minutes, at most GPU_CHECK_BUDGET_S):
#
#   1. model_gpu    benchmarks/model_gpu.py            ~1B Llama forward+backward, bf16, SDPA spec, MFU
#   2. kernels_gpu  benchmarks/kernels_gpu.py          reshard CUDA kernel: build, bitwise, vs d2d copy
#   3. train_gpu    benchmarks/train_gpu.py            actor update through ModelWorker.train, tokens/s, MFU
#   4. offload_gpu  benchmarks/train_gpu.py --mode offload   training state to host and back, bit-exact
#   5. resume_gpu   benchmarks/train_gpu.py --mode resume    optimizer state through dist_checkpointing, step replayed bit-exact
#   5. vLLM checks (sleep/wake, gpu_memory_utilization): recorded as skipped, vLLM is not on the machine.
# The checks run one after another (their timings must not overlap); the kernel check, which needs no
# megatron-core and no NCCL, runs second so that a hang in the first cannot starve it of the budget.
#
# Run from anywhere:  bash benchmarks/gpu_check.sh      (device tool: carry [".whl"])
# Wheels: .whl/ holds megatron-core 0.19.x (tried first) and 0.16.1 (fallback) for cp312; fetch them with
# bash benchmarks/fetch_gpu_wheels.sh. A megatron-core check that fails while building the model with an
# import/API error (exit 3) is rerun on the fallback; each JSON records the version it ran on.
# Output: $OUT (default benchmarks/results/gpu_<date>_<time>/), flat: gpu_check.log, model_gpu.json,
# train_gpu.json, offload_gpu.json, resume_gpu.json, kernels_gpu.json, gpu_check_summary.json. The last lines printed are
# a summary table. Exit status: 0 all passed, 1 something failed, 2 no GPU here.
# GPU_CHECK_DEVICE=cpu runs checks 1, 3, 4 as CPU dry runs at tiny sizes (a test of this script, not of a GPU).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
START=$(date +%s)
BUDGET_S=${GPU_CHECK_BUDGET_S:-390}
PY=${PYTHON:-python3}
PIP_PY=${PIP_PYTHON:-$PY}
OUT=${OUT:-benchmarks/results/gpu_$(date +%Y-%m-%d_%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
ATTEMPTS=$WORK/attempts.tsv
: > "$ATTEMPTS"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
TEE_PID=$!

export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} MAX_JOBS=${MAX_JOBS:-16}
export XDG_CACHE_HOME=${XDG_CACHE_HOME:-$WORK/cache}                # the reshard extension builds here
export MASTER_ADDR=127.0.0.1 GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo} NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-lo}
export PIP_ROOT_USER_ACTION=ignore NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-1}

say() { printf '\n=== [%4ds] %s\n' "$(( $(date +%s) - START ))" "$*"; }

say "gpu_check.sh in $ROOT -> $OUT (budget ${BUDGET_S}s)"
git -C "$ROOT" log -1 --format='commit %H %s' 2>/dev/null || true
git -C "$ROOT" status --short 2>/dev/null | head -40 || true
SMI=(nvidia-smi --format=csv --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,temperature.gpu,power.draw)
command -v nvidia-smi >/dev/null && "${SMI[@]}" || echo "nvidia-smi: not on PATH"
command -v nvcc >/dev/null && nvcc --version | tail -2 || echo "nvcc: not on PATH"
$PY - <<'EOF' || true
import os, platform, sysconfig
inc = sysconfig.get_paths().get("include", "")
print("python", platform.python_version(), "| Python.h", "present" if os.path.isfile(os.path.join(inc, "Python.h")) else f"MISSING in {inc}")
try:
    import torch
    print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| GPU", torch.cuda.is_available() and torch.cuda.get_device_name())
except Exception as exc:  # noqa: BLE001
    print("torch: import failed:", exc)
EOF

# --- megatron-core wheels: one install target per version -------------------------------------------------
shopt -s nullglob
declare -A SITE=()
MC_ORDER=()
for whl in .whl/megatron_core-*.whl; do
  ver=$(basename "$whl" | cut -d- -f2)
  SITE[$ver]=$WORK/site-$ver
  if "$PIP_PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "${SITE[$ver]}" "$whl"; then
    echo "megatron-core $ver -> ${SITE[$ver]}"
  else
    echo "megatron-core $ver: pip install of $whl FAILED"; unset "SITE[$ver]"
  fi
done
COMMON=$WORK/site-common
OTHER=()
for whl in .whl/*.whl; do [[ $(basename "$whl") == megatron_core-* ]] || OTHER+=("$whl"); done
if (( ${#OTHER[@]} )); then
  "$PIP_PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$COMMON" "${OTHER[@]}" \
    && echo "other wheels -> $COMMON: ${OTHER[*]}" || echo "other wheels: pip install FAILED"
fi
for ver in $(printf '%s\n' "${!SITE[@]}" | sort -V -r); do MC_ORDER+=("$ver"); done   # newest first
(( ${#MC_ORDER[@]} )) || echo "no megatron-core wheel in .whl/ (bash benchmarks/fetch_gpu_wheels.sh): megatron checks will fail to import"

HAVE_GPU=$($PY -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
[[ $HAVE_GPU == 1 ]] || echo "gpu_check.sh: no CUDA GPU visible to $PY; every check will report 'no GPU' and skip"

# --- one attempt of one check under its own timeout ---------------------------------------------------------
# attempt NAME LIMIT_S MEGATRON_VERSION|- CMD...    -> sets RC; appends a line to $ATTEMPTS
attempt() {
  local name=$1 limit=$2 ver=$3; shift 3
  local left=$(( BUDGET_S - ($(date +%s) - START) - 10 ))
  (( limit > left )) && limit=$left
  if (( limit < 20 )); then
    say "$name: skipped, ${left}s of the budget left"; RC=125
    printf '%s\t%s\t%s\t%s\n' "$name" "$ver" 125 0 >> "$ATTEMPTS"; return
  fi
  local path=$ROOT
  [[ $ver != - ]] && path=${SITE[$ver]}:$ROOT
  [[ -d $COMMON ]] && path=$COMMON:$path
  say "$name (megatron-core $ver, limit ${limit}s): $*"
  local t0; t0=$(date +%s)
  PYTHONPATH=$path timeout -k 10 "$limit" "$@"
  RC=$?
  local secs=$(( $(date +%s) - t0 ))
  (( RC == 124 || RC == 137 )) && echo "$name: TIMED OUT after ${limit}s"
  echo "$name: exit $RC after ${secs}s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$ver" "$RC" "$secs" >> "$ATTEMPTS"
}

# a megatron-core check: newest version first; on exit 3 (import/API error while building) the next one
megatron_check() {
  local name=$1 limit=$2; shift 2
  local vers=("${MC_ORDER[@]}")
  (( ${#vers[@]} )) || vers=(-)
  local i
  for i in "${!vers[@]}"; do
    attempt "$name" "$limit" "${vers[$i]}" "$@" --out "$OUT/$name.json"
    (( RC == 3 )) || return 0
    if (( i + 1 < ${#vers[@]} )); then
      [[ -f $OUT/$name.json ]] && mv "$OUT/$name.json" "$WORK/$name.${vers[$i]}.json"
      echo "$name: megatron-core ${vers[$i]} refused our calls; retrying on ${vers[$((i + 1))]}"
    fi
  done
}

DEVICE=${GPU_CHECK_DEVICE:-cuda}
megatron_check model_gpu 120 "$PY" benchmarks/model_gpu.py --device "$DEVICE"
attempt kernels_gpu 200 - "$PY" benchmarks/kernels_gpu.py --out "$OUT/kernels_gpu.json"
megatron_check train_gpu 120 "$PY" benchmarks/train_gpu.py --device "$DEVICE"
megatron_check offload_gpu 100 "$PY" benchmarks/train_gpu.py --mode offload --device "$DEVICE"
megatron_check resume_gpu 100 "$PY" benchmarks/train_gpu.py --mode resume --device "$DEVICE"

command -v nvidia-smi >/dev/null && "${SMI[@]}"
say "summary"
PYTHONPATH=$ROOT "$PY" benchmarks/gpu_summary.py --out-dir "$OUT" --attempts "$ATTEMPTS" --work "$WORK" \
  --started "$START" --budget "$BUDGET_S" --have-gpu "$HAVE_GPU"
STATUS=$?
rm -rf "$WORK"
exec 1>&- 2>&-
wait "$TEE_PID" 2>/dev/null
exit $STATUS

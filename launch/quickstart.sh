#!/usr/bin/env bash
# Set up (idempotently) and run the main CPU job. Until the RL loop lands this shows the 3D grid:
# the plan for 4 ranks, then a real 4-rank launch that starts megatron-core and the HybridFlow groups.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash launch/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
.venv/bin/torchrun --standalone --nproc-per-node 4 -m hybridflow_mg.cli grid --train tp=2,pp=2 --gen tp=1 --init

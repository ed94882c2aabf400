#!/usr/bin/env bash
# Set up (idempotently) and run the CPU quickstart: GRPO on synthetic addition with a tiny Llama,
# 4 ranks (Megatron TP2×DP2 → vLLM TP1×4), in-process vLLM rollouts, in a few minutes.
# PPO with a critic instead: bash launch/quickstart.sh algo.advantage.estimator=gae run.name=quickstart_ppo
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash launch/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/hybridflow-mg train configs/quickstart.yaml --nproc 4 "$@"

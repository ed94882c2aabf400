"""Evaluation of a policy's responses: pure metrics (`metrics.py`) that validation during training
logs under `val/`. Imports neither torch nor Megatron. The `eval` command's parts import their own:
`summary.py` (samples → metrics), `answers.py` (maj@k's answers), `inputs.py` (checks before launch)
and `run.py` (the evaluation on every rank); the `sweep` command's in `sweep.py` (seeds' runs, mean ± std,
consistency of their answers)."""
from hybridflow_mg.evaluation.metrics import (
    accuracy,
    distinct_n,
    maj_at_k,
    majority_answer,
    mean_by_group,
    ngram_entropy,
    pass_at_k,
    percentile,
    repetition_rate,
    response_metrics,
    truncation_rate,
)

__all__ = [
    "accuracy",
    "distinct_n",
    "maj_at_k",
    "majority_answer",
    "mean_by_group",
    "ngram_entropy",
    "pass_at_k",
    "percentile",
    "repetition_rate",
    "response_metrics",
    "truncation_rate",
]

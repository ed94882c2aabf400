"""From the samples of an evaluation to its metrics: `summarize`, and the per-sample record `EvalSample`.

Pure Python on plain data (the metric functions of `metrics.py`); no torch, no processes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from hybridflow_mg.evaluation.metrics import (
    CORRECT_AT,
    distinct_n,
    maj_at_k,
    mean,
    ngram_entropy,
    pass_at_k,
    percentile,
    repetition_rate,
    truncation_rate,
)


@dataclass(frozen=True)
class EvalSample:
    """One sampled response to one prompt, scored: a line of the samples file."""

    prompt_index: int
    """The prompt's row in the data file (0-based, file order)."""
    sample_index: int
    """Which of the prompt's n samples (0-based, sampling order: maj@k votes over the first k)."""
    data_source: str
    prompt: Any
    """The prompt as the file holds it (text, chat messages or token ids)."""
    ground_truth: Any
    response_ids: list[int]
    """The sampled token ids, the stop token that ended the sample included."""
    response: str
    """The decoded response, EOS removed (what the reward function read)."""
    finish_reason: str
    """"stop" or "length" (hit --max-tokens: truncated)."""
    reward: float
    answer: str | None
    """The extracted answer that votes in maj@k (`answers.answer_of`); None: nothing to vote with."""
    diversity_ids: list[int]
    """`response_ids` without the stop token (what the diversity metrics read)."""
    kl_k3: float | None = None
    """Σ over this sample's tokens of the k3 estimate of KL(π‖π_ref); None without a reference."""
    kl_k1: float | None = None
    """Σ over this sample's tokens of k1 = log π − log π_ref; None without a reference."""

    def record(self) -> dict[str, Any]:
        """The JSON object of the samples file."""
        row = {"prompt_index": self.prompt_index, "sample_index": self.sample_index, "data_source": self.data_source,
               "prompt": self.prompt, "ground_truth": self.ground_truth, "response": self.response,
               "response_ids": self.response_ids, "finish_reason": self.finish_reason, "reward": self.reward,
               "correct": self.reward >= CORRECT_AT, "answer": self.answer}
        if self.kl_k3 is not None:
            row["kl_ref"] = self.kl_k3 / max(len(self.response_ids), 1)
        return row


def k_values(n: int) -> list[int]:
    """The k of pass@k and maj@k reported for n samples per prompt: 1, 2, 4, … up to n, and n."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def _by_prompt(samples: Sequence[EvalSample]) -> dict[int, list[EvalSample]]:
    groups: dict[int, list[EvalSample]] = {}
    for s in samples:
        groups.setdefault(s.prompt_index, []).append(s)
    return {p: sorted(g, key=lambda s: s.sample_index) for p, g in groups.items()}


def _correctness(samples: Sequence[EvalSample], n: int, ks: Sequence[int]) -> dict[str, float]:
    """accuracy, reward_mean, pass@k and maj@k (means over prompts) of the samples of some prompts."""
    prompts = _by_prompt(samples)
    for p, group in prompts.items():
        if len(group) != n:
            raise ValueError(f"prompt {p} has {len(group)} samples, expected n={n}")
    out = {"accuracy": mean([float(s.reward >= CORRECT_AT) for s in samples]),
           "reward_mean": mean([s.reward for s in samples])}
    for k in ks:
        out[f"pass@{k}"] = mean([pass_at_k(n, sum(s.reward >= CORRECT_AT for s in g), k) for g in prompts.values()])
    for k in ks:
        out[f"maj@{k}"] = mean([maj_at_k([s.answer for s in g], [s.reward for s in g], k) for g in prompts.values()])
    return out


def summarize(samples: Sequence[EvalSample], n: int) -> dict[str, Any]:
    """Every metric of an evaluation with `n` samples per prompt, as a JSON-ready dict:

    - num_prompts, num_samples;
    - accuracy (share of all samples that are correct: the mean of per-prompt c/n, so it equals
      pass@1), reward_mean;
    - pass@k (unbiased, Chen et al. 2021) and maj@k (vote over the first k samples' answers) for
      k in `k_values(n)`, means over prompts;
    - response_len_mean, response_len_p95 (tokens, the stop token counted), truncation_rate;
    - distinct_1, distinct_2, ngram_entropy_2 (nats), repetition_rate (seq-rep-4), over all samples;
    - kl_ref and kl_ref_k1 when the samples carry a reference's KL: token means over all sampled
      tokens of the k3 and k1 estimators (see `evaluation.run`);
    - by_data_source: {source: the correctness metrics, num_prompts, response_len_mean,
      truncation_rate} (an empty source is named `unknown`).

    Raises ValueError for no samples or a prompt without exactly n samples.
    """
    if not samples:
        raise ValueError("no samples to summarize")
    ks = k_values(n)
    lengths = [len(s.response_ids) for s in samples]
    tokens = [s.diversity_ids for s in samples]
    out: dict[str, Any] = {"num_prompts": len(_by_prompt(samples)), "num_samples": len(samples),
                           **_correctness(samples, n, ks),
                           "response_len_mean": mean(lengths), "response_len_p95": percentile(lengths, 95),
                           "truncation_rate": truncation_rate([s.finish_reason for s in samples]),
                           "distinct_1": distinct_n(tokens, 1), "distinct_2": distinct_n(tokens, 2),
                           "ngram_entropy_2": ngram_entropy(tokens, 2), "repetition_rate": repetition_rate(tokens, 4)}
    if all(s.kl_k3 is not None for s in samples):
        num_tokens = max(sum(lengths), 1)
        out["kl_ref"] = sum(s.kl_k3 for s in samples) / num_tokens
        out["kl_ref_k1"] = sum(s.kl_k1 for s in samples) / num_tokens
    sources: dict[str, list[EvalSample]] = {}
    for s in samples:
        sources.setdefault(s.data_source or "unknown", []).append(s)
    out["by_data_source"] = {
        source: {"num_prompts": len(_by_prompt(group)), **_correctness(group, n, ks),
                 "response_len_mean": mean([len(s.response_ids) for s in group]),
                 "truncation_rate": truncation_rate([s.finish_reason for s in group])}
        for source, group in sorted(sources.items())}
    return out

"""Evaluation metrics of sampled responses, as pure functions on plain Python data.

    pass_at_k(n, c, k)               unbiased pass@k of one prompt (Chen et al. 2021)
    maj_at_k(answers, scores, k)     majority vote over the first k samples of one prompt
    distinct_n(responses, n)         unique n-grams / n-grams, pooled over responses (Li et al. 2016)
    ngram_entropy(responses, n)      Shannon entropy (nats) of the pooled n-gram distribution
    repetition_rate(responses, n)    mean share of repeated n-grams within a response (seq-rep-n)
    mean, percentile                 response lengths (mean, p95)
    truncation_rate(finish_reasons)  share that hit the token limit without a stop
    mean_by_group(values, groups)    the per-`data_source` breakdown
    response_metrics(...)            what one sample per prompt allows, as a dict (validation)

A *response* is a sequence of hashable tokens: token ids (what validation passes, the stop token left
out) or words. Conventions shared by every function, so that a metric never becomes NaN (which
metrics.jsonl cannot hold as standard JSON):
- an empty *list* of responses, lengths or samples is a caller's mistake: ValueError;
- an empty *response* is valid: it has no n-grams and length 0;
- a ratio whose denominator counts n-grams and finds none (every response shorter than n) is 0.0.
Nothing here imports torch.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Hashable, Sequence

CORRECT_AT = 1.0
"""A response is correct when its score is at least this: the built-in rules give 1.0 to a correct
answer and at most `reward.format_score`, which must be below 1, to a wrong one (rewards/config.py)."""

TRUNCATED = "length"
"""vLLM's finish reason of a sample that reached `max_new_tokens` without a stop token."""


def _nonempty(values: Sequence, what: str) -> None:
    if len(values) == 0:
        raise ValueError(f"{what}: no values (an empty list has no metric)")


def _positive_int(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")


# --- correctness over several samples per prompt -----------------------------------------------------------
def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """The probability that at least one of k samples, drawn without replacement from `num_samples`
    samples of which `num_correct` are correct, is correct: 1 − C(n−c, k) / C(n, k).

    This is the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on
    Code", §2.1); averaged over prompts it estimates pass@k with lower variance than drawing k
    samples once. Computed with exact integer binomials (Python ints), so large n lose nothing.

    k > n raises ValueError rather than returning a number: C(n, k) is 0 there, and no k-subset of n
    samples exists. The two usual fallbacks would mislabel the metric: the reference implementation's
    early return (`if n − c < k: return 1.0`) reports 1.0 even when no sample is correct, and pass@n
    is a lower bound that the key `pass@k` would present as pass@k. Sample at least k per prompt.

    Raises ValueError for k < 1, n < 1, c < 0, c > n or k > n.
    """
    _positive_int(num_samples, "num_samples")
    _positive_int(k, "k")
    if isinstance(num_correct, bool) or not isinstance(num_correct, int) or not 0 <= num_correct <= num_samples:
        raise ValueError(f"num_correct must be an integer in [0, num_samples={num_samples}], got {num_correct!r}")
    if k > num_samples:
        raise ValueError(f"pass@{k} needs at least k={k} samples per prompt, got {num_samples}")
    # int / int is correctly rounded in Python even when both are far beyond a float's range
    return 1.0 - math.comb(num_samples - num_correct, k) / math.comb(num_samples, k)


def majority_answer(answers: Sequence[Hashable | None]) -> int | None:
    """The index of the first sample whose answer wins a majority vote among `answers`, or None when no
    sample has an answer.

    Samples whose answer is None (nothing could be extracted) do not vote. A tie between answers with
    equally many votes goes to the one that occurs first in sample order: deterministic, independent
    of hashing, and the same answer greedy-first evaluation would see.
    """
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return None
    top = max(votes.values())
    return next(i for i, a in enumerate(answers) if a is not None and votes[a] == top)


def maj_at_k(answers: Sequence[Hashable | None], scores: Sequence[float], k: int, *,
             correct_at: float = CORRECT_AT) -> float:
    """1.0 when the majority answer of the first k samples is correct, else 0.0 (one prompt).

    `answers[i]` is the answer extracted from sample i (any hashable, e.g. a normalized number string;
    None when there is none) and `scores[i]` its reward. The vote is `majority_answer` over the first k
    samples; the voted answer is correct when the score of the first sample that gave it is at least
    `correct_at` (samples with the same answer score the same under an answer-based rule). No answer
    among the k samples counts as incorrect. Averaged over prompts this is maj@k ("self-consistency",
    Wang et al. 2023; Minerva's maj1@k, Lewkowycz et al. 2022).

    Raises ValueError when `answers` and `scores` differ in length, for k < 1, and for k > the number
    of samples (for the reason `pass_at_k` gives).
    """
    if len(answers) != len(scores):
        raise ValueError(f"maj@k: {len(answers)} answers but {len(scores)} scores")
    _positive_int(k, "k")
    if k > len(answers):
        raise ValueError(f"maj@{k} needs at least k={k} samples per prompt, got {len(answers)}")
    winner = majority_answer(answers[:k])
    return 0.0 if winner is None else float(scores[winner] >= correct_at)


def accuracy(scores: Sequence[float], *, correct_at: float = CORRECT_AT) -> float:
    """Share of responses whose score is at least `correct_at`. Raises ValueError when empty."""
    _nonempty(scores, "accuracy")
    return sum(s >= correct_at for s in scores) / len(scores)


# --- diversity -------------------------------------------------------------------------------------------
def ngrams(tokens: Sequence[Hashable], n: int) -> list[tuple]:
    """The len(tokens) − n + 1 contiguous n-grams of one response, in order (none when it is shorter)."""
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def _pooled_ngrams(responses: Sequence[Sequence[Hashable]], n: int, what: str) -> Counter:
    _nonempty(responses, what)
    _positive_int(n, "n")
    counts: Counter = Counter()
    for r in responses:
        counts.update(ngrams(r, n))
    return counts


def distinct_n(responses: Sequence[Sequence[Hashable]], n: int) -> float:
    """distinct-n: the number of distinct n-grams divided by the number of n-grams, pooled over all
    `responses` (Li et al. 2016, "A Diversity-Promoting Objective Function for Neural Conversation
    Models"). In [0, 1]; 1.0 when no n-gram repeats anywhere.

    Li et al. divide by the number of generated tokens; the count of n-grams used here equals it for
    n = 1 and keeps the ratio in [0, 1] for short responses and larger n. A response of L identical
    tokens gives 1 / (L − n + 1). Responses shorter than n contribute nothing; 0.0 when no response
    has an n-gram. Raises ValueError for no responses or n < 1.
    """
    counts = _pooled_ngrams(responses, n, f"distinct-{n}")
    total = sum(counts.values())
    return len(counts) / total if total else 0.0


def ngram_entropy(responses: Sequence[Sequence[Hashable]], n: int) -> float:
    """Shannon entropy, in nats, of the empirical distribution of n-grams pooled over `responses`:
    −Σ p log p with p = count / total (the Ent-n of Zhang et al. 2018, "Generating Informative and
    Diverse Conversational Responses via Adversarial Information Maximization").

    0.0 when a single n-gram makes up every occurrence (a response of identical tokens) or when no
    response has an n-gram; log(m) when m n-grams occur equally often. Divide by ln 2 for bits.
    Raises ValueError for no responses or n < 1.
    """
    counts = _pooled_ngrams(responses, n, f"entropy-{n}")
    total = sum(counts.values())
    return sum((c / total * math.log(total / c) for c in counts.values()), 0.0)  # Σ p log(1/p): never -0.0


def repetition_rate(responses: Sequence[Sequence[Hashable]], n: int = 4) -> float:
    """seq-rep-n: the share of n-grams within a response that repeat an earlier n-gram of the same
    response, 1 − distinct / total, averaged over responses (Welleck et al. 2020, "Neural Text
    Generation with Unlikelihood Training"; they report n = 4).

    It measures a response looping on itself, which distinct-n (pooled over responses) mixes with
    responses resembling each other. A response of L ≥ n identical tokens scores 1 − 1/(L − n + 1);
    a response shorter than n (empty included) has nothing to repeat and scores 0.0. In [0, 1).
    Raises ValueError for no responses or n < 1.
    """
    _nonempty(responses, f"seq-rep-{n}")
    _positive_int(n, "n")
    total = 0.0
    for r in responses:
        grams = ngrams(r, n)
        if grams:
            total += 1.0 - len(set(grams)) / len(grams)
    return total / len(responses)


# --- lengths and truncation ------------------------------------------------------------------------------
def mean(values: Sequence[float]) -> float:
    """The arithmetic mean. Raises ValueError when empty."""
    _nonempty(values, "mean")
    return sum(values) / len(values)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0 ≤ q ≤ 100) by linear interpolation between the two nearest ranks:
    the sorted values at positions ⌊h⌋ and ⌈h⌉ with h = (len − 1)·q/100, numpy's and torch.quantile's
    default. Lengths [0, 10] give p95 = 9.5. Raises ValueError when empty or for q outside [0, 100]."""
    _nonempty(values, "percentile")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q!r}")
    ordered = sorted(values)
    h = (len(ordered) - 1) * q / 100
    lo = math.floor(h)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (h - lo) * (ordered[hi] - ordered[lo])


def truncation_rate(finish_reasons: Sequence[str]) -> float:
    """Share of samples that reached the token limit without emitting a stop token (vLLM's finish
    reason "length"). A sample that stops exactly at the limit finished with "stop" and is not
    truncated. Raises ValueError when empty."""
    _nonempty(finish_reasons, "truncation rate")
    return sum(r == TRUNCATED for r in finish_reasons) / len(finish_reasons)


# --- breakdowns ------------------------------------------------------------------------------------------
def mean_by_group(values: Sequence[float], groups: Sequence[str]) -> dict[str, float]:
    """{group: mean of its values}, groups in sorted order (e.g. accuracy per `data_source`). Raises
    ValueError when the lists differ in length or are empty."""
    if len(values) != len(groups):
        raise ValueError(f"{len(values)} values but {len(groups)} groups")
    _nonempty(values, "mean by group")
    sums: dict[str, list[float]] = {}
    for v, g in zip(values, groups):
        sums.setdefault(g, []).append(v)
    return {g: sum(vs) / len(vs) for g, vs in sorted(sums.items())}


def response_metrics(*, scores: Sequence[float], lengths: Sequence[int], finish_reasons: Sequence[str],
                     tokens: Sequence[Sequence[Hashable]], data_sources: Sequence[str],
                     correct_at: float = CORRECT_AT) -> dict[str, float]:
    """Every metric that one response per prompt supports, as {name: value}:

    accuracy, response_len_mean, response_len_p95 (tokens, the stop token counted, as the training
    `response_len` counts them), truncation_rate, distinct_1, distinct_2, ngram_entropy_2 (nats),
    repetition_rate (seq-rep-4), and accuracy/<data_source> for each data source (`""` is named
    `unknown`).

    `tokens[i]` is response i for the diversity metrics (the stop token left out, so that every
    response ending in EOS does not count as a shared n-gram). All lists hold one entry per response;
    raises ValueError when they differ in length or are empty.
    """
    columns = {"scores": scores, "lengths": lengths, "finish_reasons": finish_reasons, "tokens": tokens,
               "data_sources": data_sources}
    if len({len(c) for c in columns.values()}) != 1:
        raise ValueError("response_metrics: columns of different lengths: " +
                         ", ".join(f"{k}={len(c)}" for k, c in columns.items()))
    _nonempty(scores, "response_metrics")
    correct = [float(s >= correct_at) for s in scores]
    out = {"accuracy": mean(correct), "response_len_mean": mean(lengths), "response_len_p95": percentile(lengths, 95),
           "truncation_rate": truncation_rate(finish_reasons),
           "distinct_1": distinct_n(tokens, 1), "distinct_2": distinct_n(tokens, 2),
           "ngram_entropy_2": ngram_entropy(tokens, 2), "repetition_rate": repetition_rate(tokens, 4)}
    for source, value in mean_by_group(correct, [s or "unknown" for s in data_sources]).items():
        out[f"accuracy/{source}"] = value
    return out


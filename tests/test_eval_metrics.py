"""Evaluation metrics (hybridflow_mg/evaluation/metrics.py) against hand-worked cases; the arithmetic is
in the comments. Pure Python, no processes."""
import math

import pytest

from hybridflow_mg.evaluation.metrics import (
    accuracy,
    distinct_n,
    maj_at_k,
    majority_answer,
    mean,
    mean_by_group,
    ngram_entropy,
    pass_at_k,
    percentile,
    repetition_rate,
    response_metrics,
    truncation_rate,
)


# --- pass@k ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k, expected", [
    (1, 1 - 3 / 5),    # 1 − C(3,1)/C(5,1) = 1 − 3/5 = 0.4 (= c/n, the plain success rate)
    (2, 1 - 3 / 10),   # 1 − C(3,2)/C(5,2) = 1 − 3/10 = 0.7
    (3, 1 - 1 / 10),   # 1 − C(3,3)/C(5,3) = 1 − 1/10 = 0.9
    (4, 1.0),          # C(3,4) = 0: every 4-subset of 5 holds a correct sample
    (5, 1.0),          # all samples drawn, 2 of them correct
])
def test_pass_at_k_n5_c2(k, expected):
    assert pass_at_k(5, 2, k) == pytest.approx(expected, abs=1e-15)


def test_pass_at_k_edges():
    assert pass_at_k(5, 0, 5) == 0.0  # C(5,5)/C(5,5) = 1: nothing correct, nothing passes
    assert pass_at_k(5, 5, 1) == 1.0  # C(0,1) = 0
    assert pass_at_k(1, 1, 1) == 1.0
    # large n stays exact: n=1000, c=1, k=500 → 1 − C(999,500)/C(1000,500) = 1 − 500/1000 = 0.5
    assert pass_at_k(1000, 1, 500) == pytest.approx(0.5, abs=1e-12)


def test_pass_at_k_refuses_k_above_n():
    # the reference code's `if n - c < k: return 1.0` would say 1.0 here, with no correct sample at all
    with pytest.raises(ValueError, match=r"pass@6 needs at least k=6 samples per prompt, got 5"):
        pass_at_k(5, 0, 6)
    with pytest.raises(ValueError, match="pass@6"):
        pass_at_k(5, 2, 6)


@pytest.mark.parametrize("n, c, k", [(0, 0, 1), (5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 1.0), (5, True, 1)])
def test_pass_at_k_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


# --- maj@k -----------------------------------------------------------------------------------------------
def test_maj_at_k_tie_goes_to_the_first_answer():
    answers = ["7", "8", "8", "7", "9"]
    scores = [1.0, 0.0, 0.0, 1.0, 0.0]  # "7" is right
    # k=1: {7:1} → "7" → correct
    assert maj_at_k(answers, scores, 1) == 1.0
    # k=3: {7:1, 8:2} → "8" → wrong
    assert maj_at_k(answers, scores, 3) == 0.0
    # k=4: {7:2, 8:2} tie; "7" occurs first (sample 0) → correct
    assert majority_answer(answers[:4]) == 0
    assert maj_at_k(answers, scores, 4) == 1.0
    # the same tie with the order reversed goes to "8"
    assert maj_at_k(["8", "7", "7", "8"], [0.0, 1.0, 1.0, 0.0], 4) == 0.0
    # k=5: {7:2, 8:2, 9:1} tie between 7 and 8 again → "7"
    assert maj_at_k(answers, scores, 5) == 1.0


def test_maj_at_k_missing_answers_do_not_vote():
    # two samples without an answer cannot outvote one with an answer
    assert majority_answer([None, None, "3"]) == 2
    assert maj_at_k([None, None, "3"], [0.0, 0.0, 1.0], 3) == 1.0
    # no answer at all → incorrect
    assert majority_answer([None, None]) is None
    assert maj_at_k([None, None], [0.0, 0.0], 2) == 0.0
    # a format score below 1 is not correct
    assert maj_at_k(["5"], [0.1], 1) == 0.0


def test_maj_at_k_errors():
    with pytest.raises(ValueError, match=r"maj@3 needs at least k=3 samples per prompt, got 2"):
        maj_at_k(["1", "1"], [1.0, 1.0], 3)
    with pytest.raises(ValueError, match="2 answers but 1 scores"):
        maj_at_k(["1", "1"], [1.0], 1)
    with pytest.raises(ValueError, match="k must be"):
        maj_at_k(["1"], [1.0], 0)


# --- diversity -------------------------------------------------------------------------------------------
IDENTICAL = [[5] * 6]  # one response: the token 5 six times


def test_diversity_of_all_identical_tokens():
    # unigrams: 6 occurrences of (5,) → 1 distinct / 6 = 1/6; bigrams: 5 of (5,5) → 1/5
    assert distinct_n(IDENTICAL, 1) == pytest.approx(1 / 6)
    assert distinct_n(IDENTICAL, 2) == pytest.approx(1 / 5)
    # one n-gram type holds all the mass: −1·log 1 = 0
    assert ngram_entropy(IDENTICAL, 1) == 0.0
    assert math.copysign(1.0, ngram_entropy(IDENTICAL, 2)) == 1.0  # +0.0: metrics.jsonl shows 0.0, not -0.0
    # 4-grams: 6 − 4 + 1 = 3, all (5,5,5,5): 1 − 1/3 = 2/3; bigrams: 1 − 1/5 = 4/5
    assert repetition_rate(IDENTICAL, 4) == pytest.approx(2 / 3)
    assert repetition_rate(IDENTICAL, 2) == pytest.approx(4 / 5)


def test_diversity_hand_example():
    responses = [list("abab"), list("abc")]
    # unigrams: a b a b a b c → 7 occurrences, {a:3, b:3, c:1}, 3 distinct → 3/7
    assert distinct_n(responses, 1) == pytest.approx(3 / 7)
    # bigrams: ab ba ab | ab bc → 5 occurrences, {ab:3, ba:1, bc:1}, 3 distinct → 3/5
    assert distinct_n(responses, 2) == pytest.approx(3 / 5)
    # unigram entropy: p = 3/7, 3/7, 1/7 → −(2·3/7·ln(3/7) + 1/7·ln(1/7))
    assert ngram_entropy(responses, 1) == pytest.approx(-(2 * 3 / 7 * math.log(3 / 7) + 1 / 7 * math.log(1 / 7)))
    # bigram entropy: p = 3/5, 1/5, 1/5
    assert ngram_entropy(responses, 2) == pytest.approx(-(3 / 5 * math.log(3 / 5) + 2 / 5 * math.log(1 / 5)))
    # seq-rep-2, per response: "abab" has ab ba ab → 2 distinct of 3 → 1/3; "abc" ab bc → 0; mean 1/6
    assert repetition_rate(responses, 2) == pytest.approx(1 / 6)
    # seq-rep-4: "abab" has one 4-gram → 0; "abc" none → 0
    assert repetition_rate(responses, 4) == 0.0
    # four equally frequent unigrams: entropy ln 4
    assert ngram_entropy([[1, 2], [3, 4]], 1) == pytest.approx(math.log(4))
    assert distinct_n([[1, 2], [3, 4]], 1) == 1.0


def test_diversity_of_short_and_empty_responses():
    # no response has a bigram: 0/0 is reported as 0.0, not NaN
    assert distinct_n([[], [7]], 2) == 0.0
    assert ngram_entropy([[], [7]], 2) == 0.0
    assert repetition_rate([[], [7]], 2) == 0.0
    # an empty response among others contributes no n-grams but counts in seq-rep's mean
    assert distinct_n([[], [1, 1]], 1) == pytest.approx(1 / 2)
    assert repetition_rate([[], [1, 1, 1]], 2) == pytest.approx((0 + (1 - 1 / 2)) / 2)


@pytest.mark.parametrize("fn", [distinct_n, ngram_entropy, repetition_rate])
def test_diversity_errors(fn):
    with pytest.raises(ValueError, match="no values"):
        fn([], 1)
    with pytest.raises(ValueError, match="n must be"):
        fn([[1]], 0)


# --- lengths, truncation, breakdown ----------------------------------------------------------------------
def test_lengths_and_truncation():
    assert mean([2, 4, 9]) == 5.0
    # h = (2 − 1)·0.95 = 0.95 → 0 + 0.95·(10 − 0) = 9.5
    assert percentile([10, 0], 95) == pytest.approx(9.5)
    # 1..20: h = 19·0.95 = 18.05 → 19 + 0.05·(20 − 19) = 19.05
    assert percentile(list(range(1, 21)), 95) == pytest.approx(19.05)
    assert percentile([3], 95) == 3.0
    assert percentile([1, 2, 3], 0) == 1.0 and percentile([1, 2, 3], 100) == 3.0
    assert truncation_rate(["stop", "length", "stop", "stop"]) == 0.25
    assert accuracy([1.0, 0.1, 0.0, 1.0]) == 0.5  # a format score of 0.1 is not correct
    for fn in (mean, truncation_rate, accuracy):
        with pytest.raises(ValueError, match="no values"):
            fn([])
    with pytest.raises(ValueError, match="no values"):
        percentile([], 95)
    with pytest.raises(ValueError, match="q must be"):
        percentile([1], 101)


def test_mean_by_group():
    assert mean_by_group([1.0, 0.0, 1.0, 1.0], ["b", "a", "b", "a"]) == {"a": 0.5, "b": 1.0}
    assert list(mean_by_group([0.0, 0.0], ["z", "a"])) == ["a", "z"]  # sorted
    with pytest.raises(ValueError, match="2 values but 1 groups"):
        mean_by_group([1.0, 0.0], ["a"])
    with pytest.raises(ValueError, match="no values"):
        mean_by_group([], [])


def test_response_metrics():
    out = response_metrics(scores=[1.0, 0.0, 1.0], lengths=[3, 7, 1],
                           finish_reasons=["stop", "length", "stop"],
                           tokens=[[4, 2], [9, 9, 9, 9, 9, 9, 9], []],
                           data_sources=["gsm8k", "math", ""])
    assert out == pytest.approx({
        "accuracy": 2 / 3, "response_len_mean": 11 / 3,
        "response_len_p95": 3 + 0.9 * (7 - 3),   # sorted 1 3 7, h = 2·0.95 = 1.9
        "truncation_rate": 1 / 3,
        "distinct_1": 3 / 9,                     # {4, 2, 9} over 2 + 7 unigrams
        "distinct_2": 2 / 7,                     # {(4,2), (9,9)} over 1 + 6 bigrams
        "ngram_entropy_2": -(1 / 7 * math.log(1 / 7) + 6 / 7 * math.log(6 / 7)),
        "repetition_rate": (0 + (1 - 1 / 4) + 0) / 3,  # seq-rep-4: the 9s have 4 four-grams, 1 distinct
        "accuracy/gsm8k": 1.0, "accuracy/math": 0.0, "accuracy/unknown": 1.0})
    with pytest.raises(ValueError, match="columns of different lengths"):
        response_metrics(scores=[1.0], lengths=[], finish_reasons=["stop"], tokens=[[1]], data_sources=[""])
    with pytest.raises(ValueError, match="no values"):
        response_metrics(scores=[], lengths=[], finish_reasons=[], tokens=[], data_sources=[])


def test_a_response_without_its_stop_token():
    from hybridflow_mg.rollout.vllm_engine import Sample

    stop = Sample(token_ids=[5, 7, 2], logprobs=[0.0] * 3, finish_reason="stop", stop_token_id=2)
    assert stop.without_stop() == [5, 7] and stop.token_ids == [5, 7, 2]  # a copy: the sample is untouched
    said_by_stops = Sample(token_ids=[5, 9], logprobs=[0.0] * 2, finish_reason="stop")
    assert said_by_stops.without_stop({9}) == [5] and said_by_stops.without_stop() == [5, 9]
    cut = Sample(token_ids=[5, 2], logprobs=[0.0] * 2, finish_reason="length", stop_token_id=None)
    assert cut.without_stop({2}) == [5, 2]  # truncated: its last token is an answer token, even if it is EOS's id

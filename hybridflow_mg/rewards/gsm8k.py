"""GSM8K: the answer is the number after the last `####`.

GSM8K's reference solutions end in `#### 72`, and models prompted (or fine-tuned) on them learn to do
the same. The ground truth may be the bare answer (`"72"`, as verl's preprocessing stores it) or a
whole reference solution ending in `#### 72`.
"""
from __future__ import annotations

from typing import Any

from hybridflow_mg.rewards.base import REWARD_FNS
from hybridflow_mg.rewards.numbers import numbers_in, parse_number

MARKER = "####"


def extract_answer(text: str, *, flexible: bool = False) -> str | None:
    """The answer a response commits to, as written (commas and `$` kept), or None.

    Strict (default): the first number after the last `####`. With `flexible`, a response without
    `####` falls back to the last number anywhere in it — lenient for models that were never taught
    the marker, but it also rewards a correct number that merely appears last in the reasoning.
    """
    if MARKER in text:
        found = numbers_in(text.rpartition(MARKER)[2])
        return found[0] if found else None
    if flexible:
        found = numbers_in(text)
        return found[-1] if found else None
    return None


def _reference(ground_truth: Any) -> str:
    text = str(ground_truth)
    return text.rpartition(MARKER)[2].strip() if MARKER in text else text.strip()


def answers_match(answer: str, reference: str) -> bool:
    """Numeric equality when both parse (`1,000` == `1000.00`), else equal text after cleaning."""
    a, b = parse_number(answer), parse_number(reference)
    if a is not None and b is not None:
        return a == b
    clean = lambda s: s.replace(",", "").replace("$", "").strip().rstrip(".")  # noqa: E731
    return clean(answer) == clean(reference)


@REWARD_FNS.register("gsm8k")
def gsm8k_reward(
    solution: str,
    ground_truth: Any,
    *,
    data_source: str = "",
    extra_info: dict | None = None,
    format_score: float = 0.0,
    flexible: bool = False,
) -> float:
    """1.0 when the `####` answer equals the ground truth; `format_score` when an answer is there but
    wrong; 0.0 when there is none. `flexible` as in `extract_answer`."""
    answer = extract_answer(solution, flexible=flexible)
    if answer is None:
        return 0.0
    return 1.0 if answers_match(answer, _reference(ground_truth)) else float(format_score)

"""The answer a response commits to, for maj@k's vote: one extractor per rule reward, by data source.

    answer_of("… #### 1,000", "openai/gsm8k")   → "1000"      (gsm8k's `extract_answer`, as a number)
    answer_of(" 64", "synthetic/arithmetic")    → "64"        (the arithmetic task: the whole response)
    answer_of("Hello  World", "my/data")         → "hello world" (no rule: the normalised text)

A sample's data source picks the reward rule as training picks it (`rewards.DEFAULT_BY_DATA_SOURCE`:
case-insensitive substring, the longest key wins); `--reward NAME` forces one rule for every sample.
The extractor of that rule gives a canonical answer, so that two responses writing the same answer
differently (`1,000` and `1000.0`) vote together; None (nothing extractable) does not vote. A rule with
no registered extractor — a data source no rule matches, or a reward function named by path — votes
on the response text, lower-cased with whitespace runs collapsed: exact-match voting, fine for short
answers and useless for long reasoning. Register an extractor for your reward's name to do better:

    @ANSWER_EXTRACTORS.register("my_reward")
    def my_answer(text: str) -> str | None: ...
"""
from __future__ import annotations

from typing import Callable

from hybridflow_mg.rewards import countdown, gsm8k, math_answer
from hybridflow_mg.rewards.compose import DEFAULT_BY_DATA_SOURCE, match_data_source
from hybridflow_mg.rewards.numbers import parse_number
from hybridflow_mg.utils.registry import Registry

AnswerFn = Callable[[str], "str | None"]
ANSWER_EXTRACTORS: Registry[AnswerFn] = Registry("answer extractor")


def normalized_text(text: str) -> str | None:
    """The response lower-cased, whitespace runs collapsed; None when nothing is left."""
    return " ".join(text.lower().split()) or None


def _number(text: str | None) -> str | None:
    """A number's canonical text (`1,000` and `1000.0` → `1000`); other text unchanged."""
    if text is None:
        return None
    value = parse_number(text)
    return text.strip() if value is None else str(value)


@ANSWER_EXTRACTORS.register("gsm8k")
def gsm8k_answer(text: str) -> str | None:
    """The number after the last `####` (strict, as the reward reads it)."""
    return _number(gsm8k.extract_answer(text))


@ANSWER_EXTRACTORS.register("math")
def math_answer_of(text: str) -> str | None:
    r"""The last `\boxed{...}`, normalised as the reward compares it (numbers as exact fractions)."""
    boxed = math_answer.last_boxed(text)
    if boxed is None:
        return None
    canonical = math_answer.normalize(boxed)
    value = math_answer.as_number(canonical)
    return str(value) if value is not None else canonical


@ANSWER_EXTRACTORS.register("arithmetic")
def arithmetic_answer(text: str) -> str | None:
    """The whole response stripped (the task's answer is the bare result), as a number when it is one."""
    return _number(text.strip() or None)


@ANSWER_EXTRACTORS.register("countdown")
def countdown_answer(text: str) -> str | None:
    """The proposed equation without spaces (equal equations written differently vote apart)."""
    equation = countdown.extract_equation(text)
    return "".join(equation.split()) if equation else None


def rule_for(data_source: str, table: dict[str, str] | None = None) -> str | None:
    """The reward rule `table` (default: the built-in data-source table) names for `data_source`:
    case-insensitive substring, the longest key first; None when none matches."""
    table = DEFAULT_BY_DATA_SOURCE if table is None else table
    key = match_data_source(data_source, table)
    return None if key is None else table[key]


def answer_of(text: str, data_source: str, *, rule: str | None = None) -> str | None:
    """The canonical answer of response `text` for maj@k (see the module docstring); `rule` forces a
    reward rule's extractor instead of the data source's."""
    name = rule if rule is not None else rule_for(data_source)
    if name is not None and name in ANSWER_EXTRACTORS:
        return ANSWER_EXTRACTORS.get(name)(text)
    return normalized_text(text)

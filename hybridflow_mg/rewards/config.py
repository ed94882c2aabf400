"""Config of the rule rewards: which function scores which sample, and DAPO's dynamic sampling."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


def _spec(key: str, value: str | None) -> None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ValueError(f"{key} must be a reward function name or 'path/to/file.py:fn'; got {value!r}")


@dataclass(kw_only=True)
class RewardTermConfig:
    """One term of a weighted mix of reward functions."""

    fn: str
    """A registered reward function name (`gsm8k`, `math`, `countdown`, `arithmetic`, ...) or a
    function by path: `path/to/file.py:fn` or `package.module:fn`."""
    weight: float = 1.0
    """Its weight in the sum; negative weights are allowed (penalty terms)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword options passed to this function, e.g. `{flexible: true}` for gsm8k."""

    def __post_init__(self):
        _spec("fn", self.fn)
        if not math.isfinite(self.weight):
            raise ValueError(f"weight must be a finite number; got {self.weight!r}")


@dataclass(kw_only=True)
class RewardConfig:
    """How rule rewards are computed: one function, a weighted mix, or chosen per data source.

    Precedence: `fn` when set, else `mix` when non-empty, else dispatch on each sample's
    `data_source` (verl datasets name it, e.g. `openai/gsm8k`, `lighteval/MATH`).
    """

    fn: str | None = None
    """The reward function for every sample: a registered name or `path/to/file.py:fn` /
    `package.module:fn`. Left out, `mix` or the data-source dispatch decides."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword options passed to `fn` (refused when the function has no such parameter)."""
    mix: list[RewardTermConfig] = field(default_factory=list)
    """A weighted sum of reward functions for every sample, e.g.
    `[{fn: math, weight: 1.0}, {fn: my_rules.py:length_penalty, weight: 0.1}]`."""
    by_data_source: dict[str, str] = field(default_factory=dict)
    """Data-source substring → reward function, consulted before the built-in table (`gsm8k` → gsm8k,
    `math` → math, `countdown` → countdown, `synthetic/arithmetic` → arithmetic). Matching ignores
    case; the longest matching substring wins."""
    builtin_data_sources: bool = True
    """Whether the built-in data-source table is consulted after `by_data_source`; false means a
    sample whose source `by_data_source` does not match is an error."""
    format_score: float = 0.0
    """Score of a response with a well-formed but wrong answer, passed to every function that takes
    a `format_score` parameter (all the built-ins do). Correct is 1.0, no answer 0.0."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: drop the groups (the n responses of one prompt) whose scores are all
    equal, as they carry no GRPO-style advantage; see `dynamic_sampling.dynamic_sampling_mask`."""

    def __post_init__(self):
        _spec("fn", self.fn)
        if self.fn is not None and self.mix:
            raise ValueError("set fn (one reward function) or mix (a weighted sum), not both")
        if self.options and self.fn is None:
            raise ValueError("options apply to fn, which is not set; give options to each mix entry instead")
        for source, spec in self.by_data_source.items():
            if not str(source):
                raise ValueError("by_data_source keys must be non-empty data-source substrings")
            _spec(f"by_data_source.{source}", spec)
        if not (math.isfinite(self.format_score) and 0.0 <= self.format_score < 1.0):
            raise ValueError(f"format_score must be in [0, 1) (correct answers score 1.0); got {self.format_score!r}")

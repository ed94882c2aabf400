"""The synthetic arithmetic task (`data/synthetic.py`): the response is the bare result.

A prompt is `23+41=` and the only correct response is `64` (then end of sequence). The rule is
strict on purpose: a tiny model learns the exact format in a short warm start, and RL should then
improve the *digits*, not find slack in the parser.
"""
from __future__ import annotations

import re
from typing import Any

from hybridflow_mg.rewards.base import REWARD_FNS

_INTEGER = re.compile(r"\s*([-+]?\d+)\s*")
_LEADING_INTEGER = re.compile(r"\s*[-+]?\d")


@REWARD_FNS.register("arithmetic")
def arithmetic_reward(
    solution: str,
    ground_truth: Any,
    *,
    data_source: str = "",
    extra_info: dict | None = None,
    format_score: float = 0.0,
) -> float:
    """1.0 when the whole response (whitespace aside) is the integer equal to the ground truth;
    `format_score` when it is some other integer or starts with one; 0.0 otherwise."""
    whole = _INTEGER.fullmatch(solution)
    if whole is not None:
        return 1.0 if int(whole.group(1)) == int(str(ground_truth).strip()) else float(format_score)
    return float(format_score) if _LEADING_INTEGER.match(solution) else 0.0

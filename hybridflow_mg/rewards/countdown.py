"""Countdown: combine the given numbers with + − × ÷ and parentheses to reach the target.

The ground truth carries the puzzle: a mapping `{"target": 24, "numbers": [4, 6, 1, 1]}` or its JSON
text. The equation is the content of the last `<answer>...</answer>` in the solution, else its last
non-empty line; a trailing `= <number>` (the model's claimed result) is ignored, the left side is
evaluated. It is correct when it uses each given number exactly once (as a multiset: a number given
twice may be used twice) and its exact value equals the target.

The equation is never handed to `eval`: it is parsed with `ast` and only integer literals, binary
`+ - * /`, unary minus and parentheses are accepted; any other node (names, calls, attributes,
powers, strings, floats) makes the answer invalid. Arithmetic is exact (`fractions.Fraction`), so
`(1/3)*3` is exactly 1 and division by zero is just a wrong answer.
"""
from __future__ import annotations

import ast
import json
import re
from collections import Counter
from fractions import Fraction
from typing import Any, Mapping

from hybridflow_mg.rewards.base import REWARD_FNS

MAX_EQUATION_CHARS = 256
"""Longer equations are refused before parsing: bounds the work a response can ask for."""

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)
_CLAIMED_RESULT = re.compile(r"=\s*[-+]?\d+(?:\.\d+)?\s*$")
_UNICODE_OPS = str.maketrans({"×": "*", "·": "*", "÷": "/", "−": "-", "–": "-"})
_BINARY_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b}


def parse_puzzle(ground_truth: Any) -> tuple[int, list[int]]:
    """(target, numbers) from a mapping or its JSON text; a malformed one is a data error (ValueError)."""
    puzzle = ground_truth
    if isinstance(puzzle, (str, bytes)):
        try:
            puzzle = json.loads(puzzle)
        except json.JSONDecodeError as e:
            raise ValueError(f"countdown ground truth {ground_truth!r} is not JSON ({e.msg})") from None
    if not isinstance(puzzle, Mapping) or "target" not in puzzle or "numbers" not in puzzle:
        raise ValueError(
            f'countdown ground truth must be like {{"target": 24, "numbers": [4, 6, 1, 1]}}; got {ground_truth!r}'
        )
    return int(puzzle["target"]), [int(n) for n in puzzle["numbers"]]


def extract_equation(solution: str) -> str | None:
    """The equation a response proposes (see the module docstring), or None when it has none."""
    tags = _ANSWER_TAG.findall(solution)
    if tags:
        text = tags[-1]
    else:
        lines = [line for line in solution.splitlines() if line.strip()]
        if not lines:
            return None
        text = lines[-1]
    text = _CLAIMED_RESULT.sub("", text.translate(_UNICODE_OPS)).strip()
    return text or None


class _Invalid(Exception):
    pass


def _evaluate(node: ast.AST, literals: list[int]) -> Fraction:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, literals)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        literals.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand, literals)
    if isinstance(node, ast.BinOp):
        left, right = _evaluate(node.left, literals), _evaluate(node.right, literals)
        if isinstance(node.op, ast.Div):
            if right == 0:
                raise _Invalid("division by zero")
            return left / right
        op = _BINARY_OPS.get(type(node.op))
        if op is not None:
            return op(left, right)
    raise _Invalid(f"{type(node).__name__} is not allowed")


def evaluate_equation(equation: str) -> tuple[Fraction, list[int]] | None:
    """(exact value, integer literals used in order) of an arithmetic equation; None when it is not
    one (syntax error, forbidden construct, too long, division by zero)."""
    if len(equation) > MAX_EQUATION_CHARS:
        return None
    try:
        tree = ast.parse(equation, mode="eval")
        literals: list[int] = []
        return _evaluate(tree, literals), literals
    except (SyntaxError, ValueError, _Invalid, RecursionError, MemoryError):
        return None


@REWARD_FNS.register("countdown")
def countdown_reward(
    solution: str,
    ground_truth: Any,
    *,
    data_source: str = "",
    extra_info: dict | None = None,
    format_score: float = 0.0,
) -> float:
    """1.0 when the equation uses exactly the given numbers and equals the target; `format_score`
    when it is a valid arithmetic equation that does not; 0.0 when there is none or it is invalid."""
    target, numbers = parse_puzzle(ground_truth)
    equation = extract_equation(solution)
    if equation is None:
        return 0.0
    result = evaluate_equation(equation)
    if result is None:
        return 0.0
    value, used = result
    if Counter(used) == Counter(numbers) and value == target:
        return 1.0
    return float(format_score)

r"""MATH-style answers: the content of the last `\boxed{...}`, compared after normalisation.

What `normalize` does (in this order), so that these forms compare equal:

* drops `\left` / `\right`, the spacing commands `\! \, \; \: \quad \qquad` and `\ `, dollar signs;
* `\dfrac` / `\tfrac` → `\frac`; shorthand `\frac12` → `\frac{1}{2}`, `\sqrt2` → `\sqrt{2}`;
* drops degrees (`^\circ`, `^{\circ}`, `\degree`) and percent signs (`50\%` == `50`, not 0.5);
* a trailing `\text{...}` / `\mbox{...}` after something else is taken as a unit and dropped
  (`10\text{ cm}` == `10`); any other `\text{X}` becomes `X` (`\text{(B)}` == `(B)`);
* `x = 5` → `5` when the left side is a single variable name;
* removes all whitespace and a trailing full stop.

Then two answers match when the strings are equal, or when both read as exact numbers (integers,
decimals, `1,000` with groups of three, `a/b`, `\frac{a}{b}` with a sign in front or on the
numerator) and are equal as rationals, or when both are tuples/intervals with the same brackets
whose elements match pairwise.

Not normalised (such answers compare as different): algebraically equal expressions (`x+1` vs `1+x`,
`\sqrt{8}` vs `2\sqrt{2}`), unordered sets in another order, scientific notation, units written
without `\text`, decimals against repeating fractions (`0.33` vs `\frac{1}{3}`), matrices.
"""
from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

from hybridflow_mg.rewards.base import REWARD_FNS
from hybridflow_mg.rewards.numbers import parse_number

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def last_boxed(text: str) -> str | None:
    r"""The content of the last `\boxed{...}` or `\fbox{...}` (braces nested to any depth), or None.

    The brace-less form `\boxed 5` gives the token after the space. An unclosed brace gives None.
    """
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    if start < 0:
        return None
    cmd = next(c for c in _BOX_COMMANDS if text.startswith(c, start))
    rest = text[start + len(cmd):]
    if rest.startswith(" "):  # `\boxed 5$`: one token, up to the closing `$` or whitespace
        token = re.match(r"\s*([^\s$]+)", rest)
        return token.group(1) if token else None
    if not rest.startswith("{"):
        return None
    depth, escaped = 0, False
    for i, ch in enumerate(rest):
        if escaped:  # `\{` and `\}` are literal braces (set notation), not grouping
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return rest[1:i]
    return None


_SPACING = re.compile(r"\\(?:!|,|;|:|quad|qquad)(?![a-zA-Z])|\\ ")
_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?![a-zA-Z])")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\degree(?![a-zA-Z])")
_TRAILING_UNIT = re.compile(r"(?<=\S)\s*\\(?:text|mbox)\{\s*[A-Za-z][A-Za-z\s.^0-9]*\}$")
_TEXT = re.compile(r"\\(?:text|mbox)\{([^{}]*)\}")
_VARIABLE_LHS = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?$")


def _fix_shorthand(text: str, command: str, num_args: int) -> str:
    r"""`\frac12` → `\frac{1}{2}`, `\sqrt2` → `\sqrt{2}`: bare single-character arguments get braces."""
    out, i = [], 0
    while (j := text.find(command, i)) >= 0:
        out.append(text[i:j + len(command)])
        i = j + len(command)
        if i < len(text) and text[i].isalpha():  # a longer command such as \sqrtx is not ours
            continue
        for _ in range(num_args):
            if i < len(text) and text[i] == "{":
                depth, k = 0, i
                while k < len(text):
                    depth += {"{": 1, "}": -1}.get(text[k], 0)
                    k += 1
                    if depth == 0:
                        break
                out.append(text[i:k])
                i = k
            elif i < len(text) and text[i].isalnum():
                out.append("{" + text[i] + "}")
                i += 1
    out.append(text[i:])
    return "".join(out)


def normalize(answer: str) -> str:
    """The canonical text form of an answer (see the module docstring for what is normalised)."""
    s = answer.strip().replace("\n", " ")
    s = _LEFT_RIGHT.sub("", s)
    s = _SPACING.sub(" ", s)
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _DEGREES.sub("", s)
    s = s.replace("\\%", "").replace("%", "")
    s = _TRAILING_UNIT.sub("", s.strip())
    s = _TEXT.sub(r"\1", s)
    s = "".join(s.split())
    lhs, eq, rhs = s.partition("=")
    if eq and "=" not in rhs and _VARIABLE_LHS.match(lhs):
        s = rhs
    s = s.rstrip(".")
    s = _fix_shorthand(s, "\\frac", 2)
    s = _fix_shorthand(s, "\\sqrt", 1)
    return s


_FRAC = re.compile(r"^([-+]?)\\frac\{([^{}]+)\}\{([^{}]+)\}$")


def as_number(s: str) -> Fraction | None:
    r"""A normalised answer as an exact number: `3`, `-0.5`, `1/2`, `\frac{1}{2}`, `-\frac{3}{4}`."""
    m = _FRAC.match(s)
    if m:
        num, den = parse_number(m.group(2)), parse_number(m.group(3))
        if num is None or den is None or den == 0:
            return None
        value = num / den
        return -value if m.group(1) == "-" else value
    return parse_number(s)


def _split_top_level(s: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start:])
    return parts


def _equal(a: str, b: str) -> bool:
    if a == b:
        return True
    x, y = as_number(a), as_number(b)
    if x is not None and y is not None:
        return x == y
    if len(a) > 2 and len(b) > 2 and a[0] + a[-1] == b[0] + b[-1] and a[0] in "([" and a[-1] in ")]":
        left, right = _split_top_level(a[1:-1]), _split_top_level(b[1:-1])
        return len(left) == len(right) > 1 and all(_equal(p, q) for p, q in zip(left, right))
    return False


def is_equiv(answer: str, reference: str) -> bool:
    """Whether two answers are the same after `normalize` (numerically where both are numbers)."""
    return _equal(normalize(answer), normalize(reference))


def _reference(ground_truth: Any) -> str:
    text = str(ground_truth)
    boxed = last_boxed(text)
    return boxed if boxed is not None else text


@REWARD_FNS.register("math")
def math_reward(
    solution: str,
    ground_truth: Any,
    *,
    data_source: str = "",
    extra_info: dict | None = None,
    format_score: float = 0.0,
) -> float:
    r"""1.0 when the last `\boxed{}` of the solution matches the ground truth (itself bare or boxed);
    `format_score` when there is a boxed answer that does not; 0.0 when there is none (or it is empty)."""
    answer = last_boxed(solution)
    if answer is None or not answer.strip():  # an empty box is no answer, not a wrong one
        return 0.0
    return 1.0 if is_equiv(answer, _reference(ground_truth)) else float(format_score)

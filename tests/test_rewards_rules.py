"""Hand-checked cases for the built-in rule rewards (gsm8k, math, countdown, arithmetic)."""
import json

import pytest

from hybridflow_mg.rewards import REWARD_FNS
from hybridflow_mg.rewards.countdown import countdown_reward, evaluate_equation, extract_equation
from hybridflow_mg.rewards.gsm8k import extract_answer, gsm8k_reward
from hybridflow_mg.rewards.math_answer import is_equiv, last_boxed, math_reward, normalize


def test_builtins_are_registered():
    assert {"gsm8k", "math", "countdown", "arithmetic"} <= set(REWARD_FNS.names())
    assert REWARD_FNS.get("gsm8k") is gsm8k_reward


# --- gsm8k ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "text, expected",
    [
        ("She has 3 + 4 = 7 apples.\n#### 7", "7"),
        ("#### 1,234", "1,234"),
        ("####-5", "-5"),
        ("The cost is #### $18.50.", "$18.50"),
        ("first #### 3 then changed her mind #### 4", "4"),
        ("#### the answer is 12 apples", "12"),
        ("The answer is 42.", None),
        ("####", None),
        ("", None),
    ],
)
def test_gsm8k_extract_strict(text, expected):
    assert extract_answer(text) == expected


def test_gsm8k_extract_flexible_falls_back_to_last_number():
    assert extract_answer("so 3 + 4 = 7, the answer is 42.", flexible=True) == "42"
    assert extract_answer("no numbers here", flexible=True) is None
    assert extract_answer("x 9 #### 5", flexible=True) == "5"  # the marker still wins


@pytest.mark.parametrize(
    "solution, truth, score",
    [
        ("... #### 72", "72", 1.0),
        ("#### 1,000", "1000", 1.0),
        ("#### 1000.00", "1,000", 1.0),
        ("#### $5", "5", 1.0),
        ("#### -3", "-3", 1.0),
        ("#### 3", "-3", 0.0),
        ("#### 71", "72", 0.0),
        ("The answer is 72", "72", 0.0),  # no marker, strict
        ("#### 72", "Natalia sold 48/2 = 24 clips.\n#### 72", 1.0),  # whole reference solution as truth
    ],
)
def test_gsm8k_reward(solution, truth, score):
    assert gsm8k_reward(solution, truth) == score


def test_gsm8k_format_score_and_flexible():
    assert gsm8k_reward("#### 71", "72", format_score=0.1) == 0.1
    assert gsm8k_reward("no answer", "72", format_score=0.1) == 0.0
    assert gsm8k_reward("The answer is 72", "72", flexible=True) == 1.0


# --- math ----------------------------------------------------------------------------------------

def test_last_boxed_nested_and_variants():
    assert last_boxed(r"so $\boxed{\frac{1}{\sqrt{2}}}$") == r"\frac{1}{\sqrt{2}}"
    assert last_boxed(r"\boxed{1} then \boxed{x^{2}+\{1\}}") == r"x^{2}+\{1\}"
    assert last_boxed(r"a set \boxed{\{1, 2\}}") == r"\{1, 2\}"
    assert last_boxed(r"\fbox{7}") == "7"
    assert last_boxed(r"$\boxed 5$") == "5"
    assert last_boxed(r"\boxed{1") is None  # unclosed
    assert last_boxed("no box") is None


@pytest.mark.parametrize(
    "a, b",
    [
        (r"\frac{1}{2}", "0.5"),
        (r"\frac12", "1/2"),
        (r"\dfrac{1}{2}", r"\tfrac12"),
        (r"-\frac{3}{4}", r"\frac{-3}{4}"),
        (r"-\frac{3}{4}", "-0.75"),
        ("0.50", ".5"),
        (r"\left( 1, \frac{1}{2} \right)", "(1,0.5)"),
        (r"10\text{ cm}", "10"),
        (r"10 \mbox{ inches}", "10"),
        (r"\text{(B)}", "(B)"),
        (r"90^\circ", "90"),
        (r"90^{\circ}", "90"),
        (r"50\%", "50"),
        ("x = 5", "5"),
        ("5.", "5"),
        (r"\$5", "5"),
        ("1,000", "1000"),
        (r"\sqrt2", r"\sqrt{2}"),
        (r"3\!\sqrt{2}", r"3\sqrt{2}"),
        (r"[2, \infty)", r"\left[ 2,\infty \right)"),
    ],
)
def test_math_equivalent(a, b):
    assert is_equiv(a, b), (normalize(a), normalize(b))


@pytest.mark.parametrize(
    "a, b",
    [
        ("x+1", "1+x"),  # algebra is not normalised
        ("0.33", r"\frac{1}{3}"),  # exact rationals, no tolerance
        (r"\frac{1}{2}", r"\frac{2}{1}"),
        ("(1,2)", "[1,2]"),  # open vs closed interval
        ("(1,2)", "(1,3)"),
        (r"\sqrt{8}", r"2\sqrt{2}"),
        ("1,2", "12"),  # a list, not a thousands separator
        ("-5", "5"),
    ],
)
def test_math_not_equivalent(a, b):
    assert not is_equiv(a, b), (normalize(a), normalize(b))


def test_math_reward():
    assert math_reward(r"Thus the answer is $\boxed{\dfrac{1}{2}}$.", "0.5") == 1.0
    assert math_reward(r"$\boxed{\frac12}$", r"\boxed{\frac{1}{2}}") == 1.0  # boxed ground truth too
    assert math_reward(r"$\boxed{3}$", "4") == 0.0
    assert math_reward(r"$\boxed{3}$", "4", format_score=0.2) == 0.2
    assert math_reward("the answer is 4", "4", format_score=0.2) == 0.0
    assert math_reward(r"$\boxed{ }$", "4", format_score=0.2) == 0.0


# --- countdown -----------------------------------------------------------------------------------

PUZZLE = {"target": 24, "numbers": [4, 6, 1, 1]}


@pytest.mark.parametrize("truth", [PUZZLE, json.dumps(PUZZLE)])
def test_countdown_correct(truth):
    assert countdown_reward("<think>4*6=24, times 1 twice</think><answer>4*6*1*1</answer>", truth) == 1.0
    assert countdown_reward("thinking...\n(1+1)*... no\n6 × 4 ÷ 1 ÷ 1 = 24", truth) == 1.0  # last line, unicode ops


@pytest.mark.parametrize(
    "solution",
    [
        "<answer>4*6</answer>",  # does not use every number
        "<answer>4*6*1*1*1</answer>",  # 1 used three times
        "<answer>6*(6-4+1+1)</answer>",  # 6 used twice, the value is 24
    ],
)
def test_countdown_wrong_numbers(solution):
    assert countdown_reward(solution, PUZZLE) == 0.0
    assert countdown_reward(solution, PUZZLE, format_score=0.1) == 0.1


def test_countdown_values():
    assert countdown_reward("<answer>4*6+1-1</answer>", PUZZLE) == 1.0
    assert countdown_reward("<answer>4*6+1+1</answer>", PUZZLE) == 0.0
    assert countdown_reward("<answer>(1/3)*3*4*6</answer>", {"target": 24, "numbers": [1, 3, 3, 4, 6]}) == 1.0
    assert countdown_reward("<answer>4/(1-1)*6</answer>", PUZZLE) == 0.0  # division by zero
    assert countdown_reward("", PUZZLE) == 0.0
    assert extract_equation("a\n<answer>1+2</answer>\nb\n<answer> 3 + 4 = 7 </answer>") == "3 + 4"


@pytest.mark.parametrize(
    "malicious",
    [
        "__import__('os').system('echo pwned')",
        "(lambda: 24)()",
        "open('/etc/passwd').read()",
        "4**6",
        "[4, 6, 1, 1]",
        "'24'",
        "4.0*6*1*1",
        "x*6*1*1",
        "1+" * 300 + "1",
        "(" * 200 + "1" + ")" * 200,
        "4*6*1*1 if True else 0",
        "True*24",
    ],
)
def test_countdown_rejects_anything_but_arithmetic(malicious):
    assert evaluate_equation(malicious) is None
    assert countdown_reward(f"<answer>{malicious}</answer>", PUZZLE, format_score=0.1) == 0.0


def test_countdown_bad_ground_truth_is_a_data_error():
    with pytest.raises(ValueError, match="countdown ground truth"):
        countdown_reward("<answer>1</answer>", "24")
    with pytest.raises(ValueError, match="not JSON"):
        countdown_reward("<answer>1</answer>", "{target: 24")


# --- arithmetic (synthetic task) ----------------------------------------------------------------

def test_arithmetic_reward():
    f = REWARD_FNS.get("arithmetic")
    assert f("64", "64") == 1.0
    assert f(" 64 ", "64") == 1.0
    assert f("63", "64") == 0.0
    assert f("64 and more", "64", format_score=0.1) == 0.1
    assert f("sixty-four", "64", format_score=0.1) == 0.0

"""Reward composition: functions by path, options, weighted mix, data-source dispatch, config, and
DAPO's dynamic-sampling mask."""
import sys
import textwrap

import pytest

from hybridflow_mg.config.load import ConfigError, build
from hybridflow_mg.rewards import (
    RewardConfig,
    RewardTermConfig,
    bind,
    build_reward_fn,
    dynamic_sampling_mask,
    load_fn_by_path,
    score_batch,
    weighted_mix,
)


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


# --- functions by path ---------------------------------------------------------------------------

def test_load_by_file_path_once(tmp_path):
    path = _write(
        tmp_path,
        "my_reward.py",
        """
        CALLS = []
        def length_bonus(solution, ground_truth, *, data_source="", extra_info=None, scale=1.0):
            return scale * len(solution)
        """,
    )
    fn = load_fn_by_path(f"{path}:length_bonus")
    assert fn("abc", "") == 3.0
    assert load_fn_by_path(f"{path}:length_bonus") is fn  # imported once, then cached
    assert bind(f"{path}:length_bonus", {"scale": 2.0})("abc", "") == 6.0


def test_load_by_module_path(tmp_path, monkeypatch):
    pkg = tmp_path / "hf_mg_test_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "scoring.py").write_text("def exact(solution, ground_truth, **kw):\n    return float(solution == ground_truth)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = load_fn_by_path("hf_mg_test_pkg.scoring:exact")
    assert fn("a", "a") == 1.0 and fn("a", "b") == 0.0
    sys.modules.pop("hf_mg_test_pkg.scoring", None)
    sys.modules.pop("hf_mg_test_pkg", None)


def _one_line_error(spec, match):
    with pytest.raises(ValueError, match=match) as info:
        load_fn_by_path(spec)
    message = str(info.value)
    assert "\n" not in message and spec in message
    return message


def test_load_errors_are_one_line(tmp_path):
    missing = str(tmp_path / "nope.py")
    _one_line_error(f"{missing}:fn", "does not exist")
    broken = _write(tmp_path, "broken.py", "def f(:\n    pass\n")
    assert "line 1" in _one_line_error(f"{broken}:f", "syntax error")
    raising = _write(tmp_path, "raising.py", "import not_a_module_anywhere_xyz\n")
    _one_line_error(f"{raising}:f", "ModuleNotFoundError")
    good = _write(tmp_path, "good.py", "def score(s, g, **kw):\n    return 1.0\nVALUE = 3\n")
    assert "score" in _one_line_error(f"{good}:scroe", "no attribute 'scroe'")  # lists what it has
    _one_line_error(f"{good}:VALUE", "not a function")
    _one_line_error("no_such_package_xyz.mod:fn", "importing module")
    _one_line_error("just_a_name_without_colon_or_fn:", "must look like")


def test_unknown_name_and_bad_option():
    with pytest.raises(ValueError, match="did you mean 'gsm8k'.*path"):
        bind("gsm8kk")
    with pytest.raises(ValueError, match="takes no option 'flexibel'.*flexible"):
        bind("gsm8k", {"flexibel": True})


# --- mix and dispatch ----------------------------------------------------------------------------

def test_weighted_mix():
    always = lambda s, g, **kw: 1.0  # noqa: E731
    length = lambda s, g, **kw: float(len(s))  # noqa: E731
    mixed = weighted_mix([(always, 0.5), (length, -0.1)])
    assert mixed("abcd", "x") == pytest.approx(0.5 - 0.4)

    cfg = RewardConfig(mix=[RewardTermConfig(fn="gsm8k", weight=0.7), RewardTermConfig(fn="math", weight=0.3)])
    fn = build_reward_fn(cfg)
    assert fn(r"#### 4 and \boxed{4}", "4") == pytest.approx(1.0)
    assert fn(r"#### 4 and \boxed{5}", "4") == pytest.approx(0.7)
    assert fn(r"#### 5 and \boxed{4}", "4") == pytest.approx(0.3)


def test_dispatch_by_data_source_defaults_and_overrides(tmp_path):
    fn = build_reward_fn(RewardConfig(format_score=0.1))
    sols = ["#### 4", r"\boxed{4}", "<answer>2*3</answer>", "64", "#### 3"]
    truths = ["4", "4", '{"target": 6, "numbers": [2, 3]}', "64", "4"]
    sources = ["openai/gsm8k", "lighteval/MATH", "countdown", "synthetic/arithmetic", "GSM8K-test"]
    assert score_batch(fn, sols, truths, sources) == [1.0, 1.0, 1.0, 1.0, 0.1]
    with pytest.raises(ValueError, match="no reward function for data_source 'mystery'.*reward.by_data_source"):
        fn("x", "y", data_source="mystery")

    path = _write(tmp_path, "rules.py", "def always(s, g, **kw):\n    return 0.5\n")
    # an override is consulted before the built-ins, even when a built-in key is longer
    fn = build_reward_fn(RewardConfig(by_data_source={"gsm": f"{path}:always", "mystery": "math"}))
    assert fn("#### 4", "4", data_source="openai/gsm8k") == 0.5
    assert fn(r"\boxed{2}", "2", data_source="mystery") == 1.0
    assert fn(r"\boxed{2}", "2", data_source="lighteval/MATH") == 1.0
    only = build_reward_fn(RewardConfig(by_data_source={"mystery": "math"}, builtin_data_sources=False))
    with pytest.raises(ValueError, match="known substrings: mystery"):
        only("#### 4", "4", data_source="openai/gsm8k")


def test_single_fn_with_options_and_format_score():
    fn = build_reward_fn(RewardConfig(fn="gsm8k", options={"flexible": True}, format_score=0.25))
    assert fn("it is 72", "72", data_source="anything") == 1.0
    assert fn("it is 71", "72") == 0.25
    with pytest.raises(ValueError, match="equally long"):
        score_batch(fn, ["a"], [])


# --- config --------------------------------------------------------------------------------------

def test_reward_config_from_mapping_and_validation():
    cfg = build(RewardConfig, {"mix": [{"fn": "gsm8k", "weight": "0.5"}, {"fn": "math"}], "dynamic_sampling": "true"})
    assert cfg.mix[0].weight == 0.5 and cfg.mix[1].weight == 1.0 and cfg.dynamic_sampling is True
    for bad, match in [
        ({"fn": "gsm8k", "mix": [{"fn": "math"}]}, "not both"),
        ({"options": {"flexible": True}}, "options apply to fn"),
        ({"format_score": 1.0}, "format_score"),
        ({"fn": " "}, "fn must be"),
        ({"mix": [{"weight": 1.0}]}, "fn"),
        ({"mix": [{"fn": "math", "weight": "inf"}]}, "finite"),
        ({"fun": "gsm8k"}, "did you mean 'fn'"),
    ]:
        with pytest.raises(ConfigError, match=match):
            build(RewardConfig, bad)


# --- dynamic sampling ----------------------------------------------------------------------------

def test_dynamic_sampling_mask():
    import torch

    scores = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.5, 0.1, 0.1])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 4, 4])
    # group 0 varies; 1 and 2 are constant; 3 has one member; 4 is constant
    result = dynamic_sampling_mask(scores, groups)
    assert result.keep.tolist() == [True, True, False, False, False, False, False, False, False]
    assert (result.num_groups_kept, result.num_groups_dropped, result.num_samples_kept) == (1, 4, 2)


def test_dynamic_sampling_unsorted_groups_and_lists():
    result = dynamic_sampling_mask([0.0, 1.0, 1.0, 1.0, 0.0], [7, 3, 7, 3, 3])
    assert result.keep.tolist() == [True, True, True, True, True]
    assert (result.num_groups_kept, result.num_groups_dropped) == (2, 0)
    empty = dynamic_sampling_mask([], [])
    assert empty.keep.numel() == 0 and empty.num_groups_kept == 0
    with pytest.raises(ValueError, match="same length"):
        dynamic_sampling_mask([1.0, 2.0], [0])


# --- what a reward function returns (issue 16) ---------------------------------------------------

@pytest.mark.parametrize("value,shown", [
    (float("nan"), "returned nan (float)"), (float("inf"), "returned inf (float)"), ("yes", "returned 'yes' (str)"),
    (None, "returned None (NoneType)"), ([1.0], "returned [1.0] (list)"), ("x" * 100, "returned '" + "x" * 56 + "... (str)"),
])
def test_a_reward_that_is_not_a_finite_number_is_one_line_naming_function_row_and_source(tmp_path, value, shown):
    from hybridflow_mg.rewards import RewardValueError

    path = _write(tmp_path, "bad_value.py", "VALUE = None\n\ndef score(s, gt, *, data_source='', extra_info=None):\n"
                                            "    return VALUE\n")
    fn = bind(f"{path}:score")
    sys.modules[load_fn_by_path(f"{path}:score").__module__].VALUE = value
    with pytest.raises(RewardValueError) as e:
        score_batch(fn, ["a", "b"], ["1", "2"], ["gsm8k", "openai/gsm8k"], indices=[7, 41])
    assert str(e.value).startswith(f"data row 7 (data_source 'gsm8k'): reward function '{path}:score' {shown}")
    assert "\n" not in str(e.value) and str(e.value).endswith("a reward must be a finite number: fix the function")
    # inside a weighted mix the term is named; a plain callable by its qualified name
    with pytest.raises(RewardValueError, match=f"reward function '{path}:score' returned"):
        weighted_mix([(fn, 1.0)])("a", "1")
    with pytest.raises(RewardValueError, match="sample 0 of the batch .* reward function 'test_a_reward_that"):
        score_batch(lambda *a, **k: value, ["a"], ["1"])


def test_numbers_of_every_kind_are_rewards():
    import numpy as np
    import torch

    values = [True, 0, 1.5, np.float32(0.25), np.int64(2), torch.tensor(0.5), torch.tensor([3.0])]
    assert score_batch(lambda s, gt, **k: values[int(s)], [str(i) for i in range(len(values))], [""] * len(values)) \
        == [1.0, 0.0, 1.5, 0.25, 2.0, 0.5, 3.0]

"""The Trainer on 2 ranks (tests/ranks/trainer2.py): ReMax with its greedy baseline, a user estimator
from `run.imports` that gets a critic, and a state_dict that replays a step exactly."""
import pytest

from tests.multirank import assert_rank_check, check_names

CHECKS = check_names("tests.ranks.trainer2")


@pytest.mark.parametrize("name", CHECKS)
def test_trainer_on_two_ranks(name):
    assert_rank_check("tests.ranks.trainer2", 2, name)

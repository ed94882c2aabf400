"""megatron-core models on several CPU ranks compared with single-process references."""
import pytest

from tests.multirank import assert_rank_check, check_names

MODULE2 = "tests.ranks.model2"


@pytest.mark.parametrize("name", check_names(MODULE2))
def test_model_on_2_ranks(name):
    assert_rank_check(MODULE2, 2, name)


MODULE4 = "tests.ranks.models4"


@pytest.mark.parametrize("name", check_names(MODULE4))
def test_models_on_4_ranks(name):
    assert_rank_check(MODULE4, 4, name)

"""The 3D-HybridEngine resharder on 8 CPU ranks: bit-exact generation weights, bytes equal to the plan."""
import pytest

from tests.multirank import assert_rank_check, check_names

MODULE = "tests.ranks.reshard8"


@pytest.mark.parametrize("name", check_names(MODULE))
def test_reshard_on_8_ranks(name):
    assert_rank_check(MODULE, 8, name)

"""Under torchrun with 8 CPU processes, megatron-core's groups equal the planned ones and all-reduces
over every kind of group (tp, pp, dp, model-parallel, micro-DP, generation tp/pp/replica) give the
expected sums, for (t,p,d) in {(2,2,2), (4,1,2), (1,2,4), (8,1,1), (2,4,1)} and each generation tp."""
import pytest

from tests.multirank import assert_rank_check, check_names

MODULE = "tests.ranks.grid8"


@pytest.mark.parametrize("name", check_names(MODULE))
def test_grid_on_8_ranks(name):
    assert_rank_check(MODULE, 8, name)

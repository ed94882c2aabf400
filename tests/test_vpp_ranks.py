"""Training at pp=2, vpp=2 (megatron-core's interleaved schedule) equals pp=2, vpp=1 (tests/ranks/vpp2.py)."""
import pytest

from tests.multirank import assert_rank_check, check_names

CHECKS = check_names("tests.ranks.vpp2")


@pytest.mark.parametrize("name", CHECKS)
def test_interleaved_pipeline_on_two_ranks(name):
    assert_rank_check("tests.ranks.vpp2", 2, name)

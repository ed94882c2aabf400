"""Issue 5's checks: Megatron shards → resharder → vLLM on 4 CPU ranks, at generation tp 1 and 2, and 4
(above the training tp: issue 15); and generation pp 2 on 2 ranks."""
import pytest

from tests.multirank import assert_rank_check, check_names


@pytest.mark.parametrize("module", ["tests.ranks.hybrid4_tg1", "tests.ranks.hybrid4_tg2"])
@pytest.mark.parametrize("name", check_names("tests.ranks.hybrid4_tg1"))
def test_hybrid_engine_on_4_ranks(module, name):
    assert_rank_check(module, 4, name)


@pytest.mark.parametrize("name", check_names("tests.ranks.hybrid4_tg4"))
def test_hybrid_engine_gen_tp_above_training_tp(name):
    assert_rank_check("tests.ranks.hybrid4_tg4", 4, name)


@pytest.mark.parametrize("name", check_names("tests.ranks.hybrid2_pp2"))
def test_hybrid_engine_gen_pipeline_parallel(name):
    assert_rank_check("tests.ranks.hybrid2_pp2", 2, name)

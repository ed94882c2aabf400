"""3D-HybridEngine checks with generation tp=1 on 4 ranks (see hybrid_common.py)."""
from tests.multirank import rank_check
from tests.ranks import hybrid_common as common

GEN_TP = 1


@rank_check
def greedy_matches_hf_and_logprobs_match_the_actor():
    common.greedy_matches_hf_and_logprobs_match_the_actor(GEN_TP)


@rank_check
def two_successive_weight_updates_each_take_effect():
    common.two_successive_weight_updates_each_take_effect(GEN_TP)


@rank_check
def seeded_sampling_repeats_and_agrees_across_the_gen_tp_group():
    common.seeded_sampling_repeats_and_agrees_across_the_gen_tp_group(GEN_TP)

"""3D-HybridEngine checks with generation tp=4 above the training tp=2, on 4 ranks (see hybrid_common.py).

The generation TP group is world ranks [0, 1, 2, 3] in vLLM's order, but each rank's layer weights are
the slice inside its own training TP half (`GenCoord.weight_tp` 0, 2, 1, 3), so ranks 1 and 2 run head
blocks other than their TP rank's, with the KV heads replicated (2 KV heads over 4 ranks). Training
(2,1) has dp = 2, so one generation replica spans both training replicas.
"""
from hybridflow_mg.models.hf_io import HFSource
from hybridflow_mg.rollout.hybrid_engine import dp_slice
from tests.multirank import rank_check
from tests.ranks import hybrid_common as common
from tests.tiny import llama_config

GEN_TP = 4
CONFIG = llama_config(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, eos_token_id=2)


@rank_check
def weight_slices_follow_the_training_tp_slices():
    from hybridflow_mg.parallel.layout import ParallelLayout

    for tp, pp in [(2, 1), (2, 2)]:
        layout = ParallelLayout(world=4, tp=tp, pp=pp, gen_tp=GEN_TP)
        assert layout.gen_tp_groups == [[0, 1, 2, 3]]
        assert [layout.gen_coord(r).weight_tp for r in range(4)] == [0, 2, 1, 3]


@rank_check
def greedy_matches_hf_and_logprobs_match_the_actor():
    common.greedy_matches_hf_and_logprobs_match_the_actor(GEN_TP, CONFIG)


@rank_check
def a_replica_spanning_two_training_replicas_serves_both_dp_slices():
    state = common.setup(GEN_TP, CONFIG)
    grid, _, hybrid = common._actor(2, 1, GEN_TP, HFSource(state["a"], state["spec"].dims))
    try:
        assert grid.layout.train_replicas_per_gen == 2 and grid.layout.dp == 2
        hybrid.sync_weights()
        whole = [c.samples[0].token_ids for c in common._greedy(hybrid)]
        sampling = state["engine"].config.sampling(temperature=0.0, max_new_tokens=12, stop_token_ids=(2,))
        mine = [c.samples[0].token_ids for c in hybrid.generate(common.PROMPTS, sampling)]
        assert mine == whole[dp_slice(len(common.PROMPTS), 2, grid.train.dp)]
    finally:
        grid.destroy()

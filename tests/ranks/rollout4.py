"""4-rank checks at t_g = 2 with strided generation TP groups: train tp=4 → gen tp=2 (d_g = 2).

HybridFlow's grouping puts ranks 0, 2 and 1, 3 into one generation TP group each (every rank's
training shard lies inside its generation shard); vLLM would build [0, 1], [2, 3] on its own. The
engine is NOT shut down here: the launch must also exit cleanly through vLLM's finalizer, after the
worker has destroyed the default group.
"""
from __future__ import annotations

import torch.distributed as dist

from hybridflow_mg.parallel.layout import ParallelLayout
from tests.multirank import rank_check
from tests.ranks import rollout_common as common

LAYOUT = ParallelLayout(world=4, tp=4, pp=1, gen_tp=2)


@rank_check
def engine_builds_strided_tp_groups():
    assert LAYOUT.gen_tp_groups == [[0, 2], [1, 3]] and LAYOUT.vllm_rank_order == [0, 2, 1, 3]
    common.check_engine_leaves_process_alone(LAYOUT)
    from vllm.distributed import parallel_state

    tp = parallel_state.get_tp_group()
    rank = dist.get_rank()
    assert tp.ranks == ([0, 2] if rank in (0, 2) else [1, 3]), tp.ranks
    assert tp.rank_in_group == rank // 2 == LAYOUT.gen_coord(rank).tp
    assert parallel_state.get_pp_group().ranks == [rank]  # gen pp=1


@rank_check
def greedy_and_logprobs_match_hf():
    common.check_greedy_and_logprobs_match_hf(LAYOUT)


@rank_check
def weight_updates_take_effect():
    common.check_weight_updates_take_effect(LAYOUT)


@rank_check
def seeded_sampling_is_identical_within_tp_group():
    mine = common.check_seeded_sampling(LAYOUT)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    group = next(g for g in LAYOUT.gen_tp_groups if dist.get_rank() in g)
    assert all(everyone[r] == mine for r in group), "ranks of one generation TP group sampled differently"
    assert everyone[0] != everyone[1], "the two replicas had different prompts but sampled alike"


@rank_check
def undecodable_ids_never_sampled():
    common.check_undecodable_ids_never_sampled(LAYOUT)

"""2-rank checks of the in-process vLLM engine at t_g = 1: train tp=2 → gen tp=1, two replicas (d_g = 2).

Each rank is its own generation replica with its own prompts; one engine per rank for the launch
(see rollout_common). The last check shuts the engine down explicitly.
"""
from __future__ import annotations

import torch.distributed as dist

from hybridflow_mg.parallel.layout import ParallelLayout
from tests.multirank import rank_check
from tests.ranks import rollout_common as common

LAYOUT = ParallelLayout(world=2, tp=2, pp=1, gen_tp=1)


@rank_check
def engine_leaves_process_alone():
    assert LAYOUT.gen_tp_groups == [[0], [1]] and LAYOUT.micro_dp_groups == [[0, 1]]
    common.check_engine_leaves_process_alone(LAYOUT)


@rank_check
def greedy_and_logprobs_match_hf():
    common.check_greedy_and_logprobs_match_hf(LAYOUT)


@rank_check
def weight_updates_take_effect():
    common.check_weight_updates_take_effect(LAYOUT)


@rank_check
def seeded_sampling_repeats_across_processes():
    mine = common.check_seeded_sampling(LAYOUT)
    # the two replicas got different prompts; the same prompts and seed must give the same samples
    # in another process too (run to run): rank 1 repeats rank 0's batch
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    assert everyone[0] != everyone[1]
    eng = common.engine(LAYOUT)
    prompts0 = [None]
    if dist.get_rank() == 0:
        prompts0[0] = common.prompts_for(LAYOUT, count=2)
    dist.broadcast_object_list(prompts0, src=0)
    sampling = common.CONFIG.sampling(n=3, temperature=1.0, top_p=0.95, top_k=100, seed=7)
    redo = [[s.token_ids for s in r.samples] for r in eng.generate(prompts0[0], sampling)]
    assert redo == everyone[0]


@rank_check
def undecodable_ids_never_sampled():
    common.check_undecodable_ids_never_sampled(LAYOUT)


@rank_check
def shutdown_keeps_trainer_groups():
    common.check_shutdown_keeps_trainer_groups(LAYOUT)

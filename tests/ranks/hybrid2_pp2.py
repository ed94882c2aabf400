"""3D-HybridEngine checks with generation pipeline parallelism: gen pp=2 on 2 ranks (see hybrid_common.py).

Training (1,2) and (2,1) both regroup into one generation replica of 2 vLLM stages, world ranks [0, 1].
The model ties its embeddings, so vLLM's last stage holds ``embed_tokens`` as the LM head (written by
the resharder like the first stage's), and the final norm; each stage holds half of the layers.
"""
import torch.distributed as dist

from tests.multirank import rank_check
from tests.ranks import hybrid_common as common
from tests.tiny import llama_config

CONFIG = llama_config(hidden_size=128, num_attention_heads=2, num_key_value_heads=2, eos_token_id=2,
                      num_hidden_layers=4, tie_word_embeddings=True)
LAYOUTS = dict(gen_pp=2, layouts=((2, 1), (1, 2)))


@rank_check
def engine_builds_the_planned_pipeline_groups():
    state = common.setup(1, CONFIG, **LAYOUTS)
    from vllm.distributed import parallel_state

    pp = parallel_state.get_pp_group()
    assert pp.ranks == [0, 1] and pp.rank_in_group == dist.get_rank()
    names = {n for n, _ in state["engine"].named_parameters()}
    stage_layers = {0: {"0", "1"}, 1: {"2", "3"}}[dist.get_rank()]
    assert {n.split(".")[2] for n in names if n.startswith("model.layers.")} == stage_layers
    assert "model.embed_tokens.weight" in names  # first stage: input; last stage: the tied LM head
    assert ("model.norm.weight" in names) == (dist.get_rank() == 1)


@rank_check
def greedy_matches_hf_and_logprobs_match_the_actor():
    common.greedy_matches_hf_and_logprobs_match_the_actor(1, CONFIG, **LAYOUTS)


@rank_check
def two_successive_weight_updates_each_take_effect():
    common.two_successive_weight_updates_each_take_effect(1)

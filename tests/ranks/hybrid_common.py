"""Checks of the 3D-HybridEngine (actor shards → resharder → in-process vLLM) on 4 CPU ranks.

One vLLM engine per launch (engines are expensive and live for the run): the modules hybrid4_tg1,
hybrid4_tg2 and hybrid4_tg4 fix the generation tp and run these checks for training layouts (2,1) and
(2,2), whose generation TP groups coincide at world 4 (so one engine serves both)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from hybridflow_mg.checkpoint.megatron import MegatronSource, convert
from hybridflow_mg.parallel.grid import Grid
from hybridflow_mg.parallel.layout import ParallelLayout
from hybridflow_mg.models.build import build_model
from hybridflow_mg.models.hf_io import HFSource, load_into_model
from hybridflow_mg.models.hf_spec import spec_from_hf
from hybridflow_mg.rollout.config import RolloutConfig
from hybridflow_mg.rollout.hybrid_engine import HybridEngine
from hybridflow_mg.rollout.vllm_engine import VLLMEngine
from hybridflow_mg.trainer.logits import token_logprobs
from tests.tiny import forward_outputs, llama_config, on_rank0_then_barrier, save_random_hf, shared_tmpdir

PROMPTS = [[1, 17, 33, 5], [1, 9, 9, 120, 44, 7], [1, 200, 3], [1, 64, 65, 66, 67]]
CONFIG = llama_config(hidden_size=128, num_attention_heads=2, num_key_value_heads=2, eos_token_id=2)
STATE: dict = {}


def setup(gen_tp: int, config=CONFIG, *, gen_pp: int = 1, layouts=((2, 1), (2, 2))):
    """Two random HF models (A, B), Megatron checkpoints of A at the training `layouts` (tp, pp), and one
    engine (the layouts' generation groups must coincide)."""
    if STATE:
        return STATE
    root = shared_tmpdir()
    a, b = os.path.join(root, "a"), os.path.join(root, "b")
    on_rank0_then_barrier(save_random_hf, config, a, seed=1)
    on_rank0_then_barrier(save_random_hf, config, b, seed=2)
    spec = spec_from_hf(config)
    for tp, pp in layouts:
        on_rank0_then_barrier(convert, HFSource(a, spec.dims), os.path.join(root, f"ckpt{tp}{pp}"), tp=tp, pp=pp,
                              role="actor", hf_config=config)
    tp, pp = layouts[-1]
    engine = VLLMEngine(a, ParallelLayout(world=dist.get_world_size(), tp=tp, pp=pp, gen_tp=gen_tp, gen_pp=gen_pp),
                        RolloutConfig(dtype="float32", max_new_tokens=12), load_weights=False)
    STATE.update(root=root, a=a, b=b, spec=spec, engine=engine, gen_pp=gen_pp, layouts=layouts)
    return STATE


def hf_greedy(model_dir: str, max_new: int = 12) -> list[list[int]]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return [model.generate(torch.tensor([p]), max_new_tokens=max_new, do_sample=False, eos_token_id=2,
                           pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]


def _actor(tp: int, pp: int, gen_tp: int, source):
    grid = Grid.create(ParallelLayout(world=dist.get_world_size(), tp=tp, pp=pp, gen_tp=gen_tp, gen_pp=STATE["gen_pp"]))
    spec = STATE["spec"]
    chunks, _ = build_model(spec, grid, role="actor", layer_spec_name="local")
    load_into_model(chunks, source, tp=tp, tp_rank=grid.train.tp, pp=pp, pp_rank=grid.train.pp)
    return grid, chunks, HybridEngine(grid, chunks, spec.dims, STATE["engine"], bucket_bytes=64_000)


def _greedy(hybrid):
    sampling = STATE["engine"].config.sampling(temperature=0.0, max_new_tokens=12, stop_token_ids=(2,))
    return hybrid.generate(PROMPTS, sampling, whole_batch=True)


def _actor_logprobs(grid, chunks, prompt, response) -> torch.Tensor | None:
    """The Megatron actor's log π of each response token (teacher forcing), on the last stage."""
    tokens = torch.tensor([prompt + response])
    logits = forward_outputs(chunks, tokens)
    if logits is None:
        return None
    targets = tokens[:, 1:]
    lp = token_logprobs(logits[:, :-1], targets, tp_group=grid.tp_group, tp_rank=grid.train.tp)
    return lp[0, len(prompt) - 1:]


def greedy_matches_hf_and_logprobs_match_the_actor(gen_tp: int, config=CONFIG, **layouts):
    setup(gen_tp, config, **layouts)
    reference = hf_greedy(STATE["a"])
    for tp, pp in STATE["layouts"]:
        grid, chunks, hybrid = _actor(tp, pp, gen_tp, MegatronSource(os.path.join(STATE["root"], f"ckpt{tp}{pp}")))
        try:
            stats = hybrid.sync_weights()
            assert stats.recv_bytes == hybrid.plan.recv_bytes
            completions = _greedy(hybrid)
            for c, want in zip(completions, reference):
                assert c.samples[0].token_ids == want, (tp, pp, c.samples[0].token_ids, want)
            for prompt, c in zip(PROMPTS, completions):
                mine = _actor_logprobs(grid, chunks, prompt, c.samples[0].token_ids)
                if mine is not None:
                    diff = (mine - torch.tensor(c.samples[0].logprobs)).abs().max().item()
                    assert diff <= 1e-4, f"vLLM vs Megatron actor logprobs differ by {diff} at tp={tp} pp={pp}"
        finally:
            grid.destroy()


def two_successive_weight_updates_each_take_effect(gen_tp: int):
    setup(gen_tp)
    spec, (tp, pp) = STATE["spec"], STATE["layouts"][-1]
    grid, chunks, hybrid = _actor(tp, pp, gen_tp, HFSource(STATE["b"], spec.dims))
    try:
        hybrid.sync_weights()
        assert [c.samples[0].token_ids for c in _greedy(hybrid)] == hf_greedy(STATE["b"])
        load_into_model(chunks, HFSource(STATE["a"], spec.dims), tp=tp, tp_rank=grid.train.tp, pp=pp, pp_rank=grid.train.pp)
        hybrid.sync_weights()
        assert [c.samples[0].token_ids for c in _greedy(hybrid)] == hf_greedy(STATE["a"])
    finally:
        grid.destroy()


def seeded_sampling_repeats_and_agrees_across_the_gen_tp_group(gen_tp: int):
    setup(gen_tp)
    grid, _, hybrid = _actor(2, 1, gen_tp, HFSource(STATE["a"], STATE["spec"].dims))
    try:
        hybrid.sync_weights()
        sampling = STATE["engine"].config.sampling(n=3, temperature=1.0, top_k=50, max_new_tokens=8, seed=7)
        first = hybrid.generate(PROMPTS, sampling, whole_batch=True)
        again = hybrid.generate(PROMPTS, sampling, whole_batch=True)
        assert [[s.token_ids for s in c.samples] for c in first] == [[s.token_ids for s in c.samples] for c in again]
        # every rank of the generation TP group sampled the same tokens (gathered per rank, compared)
        mine = STATE["engine"].generate(PROMPTS[:2], sampling)
        seen = [None] * dist.get_world_size()
        dist.all_gather_object(seen, [[s.token_ids for s in c.samples] for c in mine])
        group = next(g for g in grid.layout.gen_tp_groups if grid.rank in g)
        assert all(seen[r] == seen[group[0]] for r in group)
        other = hybrid.generate(PROMPTS, engine_sampling(seed=8), whole_batch=True)
        assert [[s.token_ids for s in c.samples] for c in other] != [[s.token_ids for s in c.samples] for c in first]
    finally:
        grid.destroy()


def engine_sampling(seed: int):
    return STATE["engine"].config.sampling(n=3, temperature=1.0, top_k=50, max_new_tokens=8, seed=seed)

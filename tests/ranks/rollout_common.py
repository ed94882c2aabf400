"""Checks of the in-process vLLM engine against HF transformers, shared by rollout2.py and rollout4.py.

Every rank builds ONE engine per launch (cached here: engines cost seconds and a GB each, and
destroying one is the dangerous part) on a tiny random Llama that rank 0 saves to a shared folder:
fp32, head_dim 64, 2 query heads sharing 1 KV head (replicated at t_g = 2), vocab 300 (vLLM pads it
to 320, so rank t_g − 1 holds padding rows). The HF model with the same weights is the reference.
Prompts differ per generation replica, so every replica proves itself on its own batch.
"""
from __future__ import annotations

import atexit
import gc
import os
import shutil
import tempfile

import torch
import torch.distributed as dist

from hybridflow_mg.parallel.layout import ParallelLayout
from hybridflow_mg.models.layouts import rules_for
from hybridflow_mg.models.rowmaps import shard_index
from hybridflow_mg.rollout.config import RolloutConfig

VOCAB = 300
TINY = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=64, max_position_embeddings=256, tie_word_embeddings=False,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)
MAX_NEW = 16
CONFIG = RolloutConfig(dtype="float32", block_size=32, kv_cache_memory_bytes=64 << 20, max_model_len=128,
                       max_num_seqs=16, max_new_tokens=MAX_NEW, seed=0)
_STATE: dict = {}


# --- the model ---------------------------------------------------------------------------------------
def hf_config():
    from transformers import LlamaConfig

    return LlamaConfig(**TINY)


def random_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """HF weights from a private generator: the same on every rank, the trainer's RNG untouched."""
    from transformers import LlamaForCausalLM

    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        names = {n: p.shape for n, p in LlamaForCausalLM(hf_config()).named_parameters()}
    # std 0.15 keeps logits peaked enough (std ≈ 1.7) that greedy never sits on a float-rounding tie
    return {n: (1 + 0.1 * torch.randn(s, generator=gen)) if len(s) == 1 else 0.15 * torch.randn(s, generator=gen)
            for n, s in names.items()}


def hf_model(state_dict):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(hf_config()).float().eval()
    model.load_state_dict(state_dict)
    return model


def shared_model_dir() -> str:
    """Rank 0 saves the weights of seed 0 with save_pretrained; every rank gets the folder."""
    if "dir" not in _STATE:
        path = [None]
        if dist.get_rank() == 0:
            path[0] = tempfile.mkdtemp(prefix="hf_rollout_")
            atexit.register(shutil.rmtree, path[0], True)
            hf_model(random_state_dict(0)).save_pretrained(path[0])
        dist.broadcast_object_list(path, src=0)
        dist.barrier()
        _STATE["dir"] = path[0]
    return _STATE["dir"]


def hf_greedy(model, prompt: list[int], max_new: int = MAX_NEW, suppress: list[int] | None = None) -> list[int]:
    from transformers import GenerationConfig

    gen = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=None, pad_token_id=0,
                           suppress_tokens=suppress)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             generation_config=gen)
    return out[0, len(prompt):].tolist()


def hf_logprobs(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """HF log_softmax of each response token given everything before it."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].float()
    logp = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
    return logp.gather(1, torch.tensor(response)[:, None]).squeeze(1)


def prompts_for(layout: ParallelLayout, count: int = 4) -> list[list[int]]:
    """Different prompts per generation replica (identical within a TP group), lengths 3..3+count."""
    replica = layout.gen_coord(dist.get_rank()).replica
    gen = torch.Generator().manual_seed(1000 + replica)
    return [torch.randint(0, VOCAB, (3 + 2 * i,), generator=gen).tolist() for i in range(count)]


# --- the engine (one per launch) ---------------------------------------------------------------------
def engine(layout: ParallelLayout):
    if "engine" not in _STATE:
        from hybridflow_mg.rollout.vllm_engine import VLLMEngine

        _STATE["engine"] = VLLMEngine(shared_model_dir(), layout, CONFIG)
    return _STATE["engine"]


def check_engine_leaves_process_alone(layout: ParallelLayout) -> None:
    """Build the engine; RNGs, threads, gc, env and every trainer group are as before; groups follow the plan."""
    import random

    import numpy as np

    path = shared_model_dir()  # before the snapshot: saving uses the RNG-free generator only
    trainer_group = dist.new_group(list(range(dist.get_world_size())))  # stands in for Megatron's groups
    torch.manual_seed(1234 + dist.get_rank())
    random.seed(5)
    np.random.seed(6)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy(), torch.get_num_threads(),
              torch.set_num_threads, gc.get_freeze_count(), dict(os.environ))
    assert path
    eng = engine(layout)
    after = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy(), torch.get_num_threads(),
             torch.set_num_threads, gc.get_freeze_count(), dict(os.environ))
    assert torch.equal(before[0], after[0]), "torch RNG changed"
    assert before[1] == after[1], "python RNG changed"
    assert np.array_equal(before[2], after[2]), "numpy RNG changed"
    assert before[3:6] == after[3:6], f"threads / set_num_threads / gc freeze changed: {before[3:6]} → {after[3:6]}"
    env_changed = {k for k in set(before[6]) | set(after[6]) if before[6].get(k) != after[6].get(k)}
    assert all(k.startswith("VLLM_") for k in env_changed), sorted(env_changed)
    assert "LD_PRELOAD" not in env_changed and os.environ.get("LOCAL_WORLD_SIZE") == before[6].get("LOCAL_WORLD_SIZE")

    planned = next(g for g in layout.gen_tp_groups if dist.get_rank() in g)
    assert eng.tp_group_ranks == planned, (eng.tp_group_ranks, planned)
    for group in (None, trainer_group):  # the trainer's groups still add up
        t = torch.ones(1)
        dist.all_reduce(t, group=group)
        assert t.item() == dist.get_world_size()
    # the weights are plain per-rank shards (vllm_cpu item 3): nothing was repacked away
    shapes = dict((n, tuple(p.shape)) for n, p in eng.named_parameters())
    assert all(0 not in s for s in shapes.values()), shapes
    _STATE["trainer_group"] = trainer_group


def check_greedy_and_logprobs_match_hf(layout: ParallelLayout) -> None:
    """(a) fp32 greedy equals HF generate token for token; (b) its logprobs equal HF log_softmax (1e-4)."""
    eng = engine(layout)
    model = hf_model(random_state_dict(0))
    prompts = prompts_for(layout)
    rng = torch.get_rng_state()
    results = eng.generate(prompts, CONFIG.sampling(temperature=0.0))
    assert torch.equal(rng, torch.get_rng_state()), "generate moved the trainer's RNG"
    for prompt, result in zip(prompts, results):
        (sample,) = result.samples
        assert result.prompt_token_ids == prompt
        assert sample.token_ids == hf_greedy(model, prompt), (prompt, sample.token_ids)
        assert sample.finish_reason == "length" and len(sample.logprobs) == MAX_NEW
        ref = hf_logprobs(model, prompt, sample.token_ids)
        assert torch.allclose(torch.tensor(sample.logprobs), ref, atol=1e-4, rtol=0), (sample.logprobs, ref.tolist())


def _scribble_vocab_padding(eng, layout: ParallelLayout) -> int:
    """Huge random rows in the LM head's padding rows (where this rank holds any): were they not dropped
    from the logits, greedy would pick a padding id nearly every step. Returns rows written."""
    output = next(r for r in rules_for(eng.dims) if r.key == "output")
    pad = (shard_index(output, "vllm", eng.dims, layout.gen_tp, eng.tp_rank) < 0).nonzero().squeeze(1)
    params = dict(eng.named_parameters())
    with torch.no_grad():
        params["lm_head.weight"][pad] = 1e3 * torch.randn(len(pad), eng.dims.hidden_size,
                                                        generator=torch.Generator().manual_seed(3))
    eng.weights_updated()
    return len(pad)


def check_weight_updates_take_effect(layout: ParallelLayout) -> None:
    """(c) two successive direct updates (FULL HF tensors → this rank's shards via the row maps) each
    take effect; padding rows of the LM head are never sampled whatever they hold."""
    eng = engine(layout)
    prompts = prompts_for(layout, count=3)
    greedy = CONFIG.sampling(temperature=0.0)
    seen = []
    for seed in (1, 2):
        weights = random_state_dict(seed)
        assert eng.load_hf_state_dict(weights) == len(dict(eng.named_parameters()))
        padded_rows = _scribble_vocab_padding(eng, layout)
        model = hf_model(weights)
        outs = [r.samples[0] for r in eng.generate(prompts, greedy)]
        for prompt, sample in zip(prompts, outs):
            assert sample.token_ids == hf_greedy(model, prompt), (seed, prompt)
            assert max(sample.token_ids) < VOCAB
            ref = hf_logprobs(model, prompt, sample.token_ids)
            assert torch.allclose(torch.tensor(sample.logprobs), ref, atol=1e-4, rtol=0)
        seen.append([s.token_ids for s in outs])
    assert seen[0] != seen[1], "the second weight set generated what the first did"
    holds_padding = eng.tp_rank == layout.gen_tp - 1
    assert (padded_rows > 0) == holds_padding, (padded_rows, eng.tp_rank)
    try:
        eng.load_hf_state_dict({k: v for k, v in random_state_dict(1).items() if k != "model.norm.weight"})
    except KeyError as e:
        assert "model.norm.weight" in str(e)
    else:
        raise AssertionError("a state dict without model.norm.weight was accepted")


def check_seeded_sampling(layout: ParallelLayout) -> list:
    """(d) sampling with a seed repeats; another seed differs; n samples, top-k/top-p, stop tokens;
    sampled logprobs equal HF log_softmax. Returns this rank's samples for cross-rank checks."""
    eng = engine(layout)
    weights = random_state_dict(1)
    eng.load_hf_state_dict(weights)
    model = hf_model(weights)
    prompts = prompts_for(layout, count=2)
    sampling = CONFIG.sampling(n=3, temperature=1.0, top_p=0.95, top_k=100, seed=7)
    first = eng.generate(prompts, sampling)
    again = eng.generate(prompts, sampling)
    other = eng.generate(prompts, CONFIG.sampling(n=3, temperature=1.0, top_p=0.95, top_k=100, seed=8))
    tokens = [[s.token_ids for s in r.samples] for r in first]
    assert tokens == [[s.token_ids for s in r.samples] for r in again]
    assert [[s.logprobs for s in r.samples] for r in first] == [[s.logprobs for s in r.samples] for r in again]
    assert tokens != [[s.token_ids for s in r.samples] for r in other]
    for prompt, result in zip(prompts, first):
        assert len(result.samples) == 3 and len({tuple(s.token_ids) for s in result.samples}) > 1
        for sample in result.samples:
            assert max(sample.token_ids) < VOCAB
            ref = hf_logprobs(model, prompt, sample.token_ids)  # raw logprobs: the model's own distribution
            assert torch.allclose(torch.tensor(sample.logprobs), ref, atol=1e-4, rtol=0)
    # stop tokens: stop at the first occurrence of greedy's 6th token, which is included
    greedy = eng.generate(prompts[:1], CONFIG.sampling(temperature=0.0))[0].samples[0].token_ids
    stop = greedy[5]
    cut = greedy.index(stop)
    stopped = eng.generate(prompts[:1], CONFIG.sampling(temperature=0.0, stop_token_ids=[stop]))[0].samples[0]
    assert stopped.token_ids == greedy[:cut + 1] and stopped.finish_reason == "stop" and stopped.stop_token_id == stop
    return tokens


def check_undecodable_ids_never_sampled(layout: ParallelLayout) -> None:
    """A tokenizer smaller than the model's vocab (`num_decodable_ids`, as Qwen2.5's 151665 ids under
    151936 rows): at temperature 2, where unmasked samples hit the top third of the vocab often, no id at
    or above it is sampled; greedy is HF's greedy with those ids suppressed; logprobs are still the
    model's own (raw) ones. Back at None, sampling is exactly what it was."""
    eng = engine(layout)
    weights = random_state_dict(1)
    eng.load_hf_state_dict(weights)
    model = hf_model(weights)
    prompts = prompts_for(layout, count=2)
    decodable = 200
    hot = CONFIG.sampling(n=4, temperature=2.0, seed=11)

    def ids(results) -> list[int]:
        return [t for r in results for s in r.samples for t in s.token_ids]

    unmasked = ids(eng.generate(prompts, hot))
    assert max(unmasked) >= decodable  # so the check would see a leak
    eng.num_decodable_ids = decodable
    try:
        masked = eng.generate(prompts, hot)
        assert max(ids(masked)) < decodable and len(ids(masked)) == len(prompts) * 4 * MAX_NEW
        for prompt, result in zip(prompts, masked):
            sample = result.samples[0]
            ref = hf_logprobs(model, prompt, sample.token_ids)
            assert torch.allclose(torch.tensor(sample.logprobs), ref, atol=1e-4, rtol=0)
        for prompt, result in zip(prompts, eng.generate(prompts, CONFIG.sampling(temperature=0.0))):
            assert result.samples[0].token_ids == hf_greedy(model, prompt, suppress=list(range(decodable, VOCAB)))
    finally:
        eng.num_decodable_ids = None
    assert ids(eng.generate(prompts, hot)) == unmasked  # without the mask, exactly as before


def check_shutdown_keeps_trainer_groups(layout: ParallelLayout) -> None:
    """Shutting the engine down releases vLLM's groups only: the default and trainer groups still work."""
    from vllm.distributed import parallel_state

    _STATE.pop("engine").shutdown()
    assert dist.is_initialized() and parallel_state._TP is None and parallel_state._WORLD is None
    for group in (None, _STATE["trainer_group"]):
        t = torch.ones(1)
        dist.all_reduce(t, group=group)
        assert t.item() == dist.get_world_size()

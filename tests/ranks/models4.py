"""4-rank checks of models from HF checkpoints: logits, values and import memory vs transformers."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from hybridflow_mg.checkpoint.megatron import MegatronSource, convert
from hybridflow_mg.parallel.grid import Grid
from hybridflow_mg.parallel.layout import ParallelLayout
from hybridflow_mg.models.build import build_model
from hybridflow_mg.models.hf_io import HFSource, load_into_model
from hybridflow_mg.models.hf_spec import read_hf_config, spec_from_hf
from tests.multirank import rank_check
from tests.tiny import forward_outputs, llama_config, on_rank0_then_barrier, save_random_hf, shared_tmpdir

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
TOKENS = torch.randint(0, 250, (2, 9), generator=torch.Generator().manual_seed(11))


def _megatron_outputs(hf_dir, tp, pp, role="actor", source=None):
    config = read_hf_config(hf_dir)
    grid = Grid.create(ParallelLayout(world=4, tp=tp, pp=pp, gen_tp=tp))
    try:
        spec = spec_from_hf(config)
        chunks, built = build_model(spec, grid, role=role, layer_spec_name="local")
        load_into_model(chunks, source or HFSource(hf_dir, spec.dims), tp=tp, tp_rank=grid.train.tp, pp=pp,
                        pp_rank=grid.train.pp)
        out = forward_outputs(chunks, TOKENS)
        if out is not None and out.size(-1) > 1 and tp > 1:  # gather the vocab-parallel logits
            parts = [torch.empty_like(out) for _ in range(tp)]
            dist.all_gather(parts, out.contiguous(), group=grid.tp_group)
            out = torch.cat(parts, dim=-1)
        return out, spec
    finally:
        grid.destroy()


def _hf_logits(hf_dir):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(TOKENS).logits


def _check_logits(config):
    root = shared_tmpdir()
    hf_dir = os.path.join(root, "hf")
    on_rank0_then_barrier(save_random_hf, config, hf_dir, shard_size="40KB")  # sharded, with an index
    reference = _hf_logits(hf_dir)
    for tp, pp in LAYOUTS:
        logits, spec = _megatron_outputs(hf_dir, tp, pp)
        if logits is None:
            continue  # not a last-stage rank
        vocab = spec.dims.vocab_size
        assert logits.shape[-1] == spec.dims.padded_vocab("mcore", tp) and vocab % (tp * 128) != 0
        assert torch.isinf(logits[..., vocab:]).all(), "padded vocab columns must be -inf"
        diff = (logits[..., :vocab] - reference).abs().max().item()
        assert diff <= 1e-4, f"tp={tp} pp={pp}: max |logits − HF| = {diff}"


@rank_check
def llama_gqa_logits_match_transformers():
    # 8 heads, 4 kv heads: num_kv_heads / t = 2 at t = 2; vocab 250 divides by no t·128
    _check_logits(llama_config(num_attention_heads=8, num_key_value_heads=4, hidden_size=64))


@rank_check
def llama_tied_embeddings_logits_match_transformers():
    _check_logits(llama_config(tie_word_embeddings=True))


@rank_check
def qwen2_biases_logits_match_transformers():
    _check_logits(llama_config(architectures=["Qwen2ForCausalLM"], model_type="qwen2"))


@rank_check
def llama3_rope_scaling_logits_match_transformers():
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16, "rope_theta": 500000.0}
    _check_logits(llama_config(rope_parameters=rope))


@rank_check
def checkpoint_saved_at_one_layout_loads_at_another():
    root = shared_tmpdir()
    hf_dir, ckpt = os.path.join(root, "hf"), os.path.join(root, "ckpt")
    config = llama_config()
    on_rank0_then_barrier(save_random_hf, config, hf_dir)
    spec = spec_from_hf(config)
    on_rank0_then_barrier(convert, HFSource(hf_dir, spec.dims), ckpt, tp=2, pp=2, role="actor", hf_config=config)
    reference = _hf_logits(hf_dir)
    for tp, pp in [(1, 1), (2, 1), (1, 2)]:
        logits, _ = _megatron_outputs(hf_dir, tp, pp, source=MegatronSource(ckpt))
        if logits is not None:
            assert (logits[..., :250] - reference).abs().max().item() <= 1e-4


@rank_check
def critic_and_reward_values_match_single_process():
    import transformers

    root = shared_tmpdir()
    hf_dir = os.path.join(root, "rm")
    config = llama_config(architectures=["LlamaForSequenceClassification"], num_labels=1, pad_token_id=0)
    on_rank0_then_barrier(save_random_hf, config, hf_dir)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():  # per-token scores: the head on every position (HF pools the last one)
        reference = hf.score(hf.model(TOKENS).last_hidden_state)
        pooled = hf(TOKENS).logits
    for role in ("critic", "reward"):
        for tp, pp in [(2, 1), (2, 2)]:
            values, _ = _megatron_outputs(hf_dir, tp, pp, role=role)
            if values is not None:
                assert values.shape == (2, 9, 1)
                assert (values - reference).abs().max().item() <= 1e-5, (role, tp, pp)
                assert (values[:, -1] - pooled).abs().max().item() <= 1e-5  # the reward-model score


def _rss_peak_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


@rank_check
def import_peak_memory_stays_below_the_model_size():
    root = shared_tmpdir()
    hf_dir = os.path.join(root, "big")
    config = llama_config(hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=4,
                          num_hidden_layers=4, vocab_size=12000)
    on_rank0_then_barrier(save_random_hf, config, hf_dir)
    model_bytes = sum(os.path.getsize(os.path.join(hf_dir, f)) for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
    grid = Grid.create(ParallelLayout(world=4, tp=4, pp=1, gen_tp=4))
    try:
        spec = spec_from_hf(config)
        chunks, _ = build_model(spec, grid, role="actor", layer_spec_name="local")
        shard_bytes = sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (the peak RSS) to the current RSS
        before = _rss_peak_kib()
        loaded = load_into_model(chunks, HFSource(hf_dir, spec.dims), tp=4, tp_rank=grid.train.tp, pp=1, pp_rank=0)
        peak = (_rss_peak_kib() - before) * 1024
        assert loaded == shard_bytes
        print(f"rank {grid.rank}: model {model_bytes / 1e6:.1f} MB, shard {shard_bytes / 1e6:.1f} MB, "
              f"import peak +{peak / 1e6:.1f} MB")
        largest = 4 * config["vocab_size"] * config["hidden_size"]  # the embedding, fp32
        # the bound: a rank holds its shard plus at most one tensor in flight, never the model
        assert peak <= shard_bytes + largest and peak < model_bytes / 2, f"import peak {peak / 1e6:.1f} MB vs model {model_bytes / 1e6:.1f} MB"
    finally:
        grid.destroy()


@rank_check
def sdpa_spec_logits_match_transformers():
    """The torch-SDPA core attention (the GPU spec without TE) is exact on CPU too."""
    root = shared_tmpdir()
    hf_dir = os.path.join(root, "hf")
    config = llama_config(num_attention_heads=8, num_key_value_heads=2)
    on_rank0_then_barrier(save_random_hf, config, hf_dir)
    reference = _hf_logits(hf_dir)
    grid = Grid.create(ParallelLayout(world=4, tp=2, pp=2, gen_tp=2))
    try:
        spec = spec_from_hf(config)
        chunks, built = build_model(spec, grid, role="actor", layer_spec_name="sdpa")
        assert built.layer_spec == "sdpa"
        load_into_model(chunks, HFSource(hf_dir, spec.dims), tp=2, tp_rank=grid.train.tp, pp=2, pp_rank=grid.train.pp)
        logits = forward_outputs(chunks, TOKENS)
        if logits is not None:
            parts = [torch.empty_like(logits) for _ in range(2)]
            dist.all_gather(parts, logits.contiguous(), group=grid.tp_group)
            assert (torch.cat(parts, -1)[..., :250] - reference).abs().max().item() <= 1e-4
    finally:
        grid.destroy()


@rank_check
def critic_starts_from_the_actor_weights():
    """A critic built from a *ForCausalLM checkpoint: the trunk is the actor's, the head starts at 0."""
    root = shared_tmpdir()
    hf_dir = os.path.join(root, "actor")
    config = llama_config()
    on_rank0_then_barrier(save_random_hf, config, hf_dir)
    grid = Grid.create(ParallelLayout(world=4, tp=2, pp=2, gen_tp=2))
    try:
        actor_spec, critic_spec = spec_from_hf(config), spec_from_hf(config, head="value")
        kw = dict(tp=2, tp_rank=grid.train.tp, pp=2, pp_rank=grid.train.pp)
        actor, _ = build_model(actor_spec, grid, role="actor", layer_spec_name="local")
        critic, _ = build_model(critic_spec, grid, role="critic", layer_spec_name="local")
        load_into_model(actor, HFSource(hf_dir, actor_spec.dims), **kw)
        load_into_model(critic, HFSource(hf_dir, critic_spec.dims), skip=("value_head",), **kw)
        actor_params = dict(actor[0].named_parameters())
        for name, param in critic[0].named_parameters():
            if name == "output_layer.weight":
                assert param.shape == (1, 64) and not param.any()
            else:
                assert torch.equal(param, actor_params[name]), name
        values = forward_outputs(critic, TOKENS)
        if values is not None:
            assert values.shape == (2, 9, 1) and not values.any()
    finally:
        grid.destroy()

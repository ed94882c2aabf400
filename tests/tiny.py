"""Tiny model configs and random HF checkpoints that tests make themselves (no downloads)."""
from __future__ import annotations

from pathlib import Path


def llama_config(**overrides) -> dict:
    """A small Llama config.json dict: GQA (4 heads, 2 kv heads), vocab not a multiple of 2·128."""
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=96,
               num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, vocab_size=250,
               max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu",
               rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, torch_dtype="float32")
    cfg.update(overrides)
    return cfg


def save_random_hf(config: dict, out_dir: str | Path, seed: int = 0, shard_size: str | None = None) -> Path:
    """Write a randomly initialised transformers model for `config` to `out_dir` (safetensors)."""
    import torch
    import transformers

    out_dir = Path(out_dir)
    arch = config["architectures"][0]
    hf_config = transformers.AutoConfig.for_model(config["model_type"],
                                                  **{k: v for k, v in config.items() if k != "model_type"})
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(hf_config).to(torch.float32)
    with torch.no_grad():  # HF zero-inits some tensors (biases, score); make every weight matter
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(out_dir, safe_serialization=True, **kwargs)
    return out_dir


def shared_tmpdir() -> str:
    """A temporary directory made by rank 0 and known to every rank (call on all ranks)."""
    import tempfile

    import torch.distributed as dist

    path = [tempfile.mkdtemp(prefix="hf_test_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path, src=0)
    return path[0]


def on_rank0_then_barrier(fn, *args, **kwargs):
    """Run `fn` on rank 0 (e.g. writing a model), then let every rank continue."""
    import torch.distributed as dist

    if dist.get_rank() == 0:
        fn(*args, **kwargs)
    dist.barrier()


def forward_outputs(chunks, tokens):
    """Per-token outputs ([b, s, v/tp] logits or [b, s, 1] values) on the last stage, via megatron-core's
    forward-only schedule (p2p between stages); None on other stages."""
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    positions = torch.arange(tokens.size(1)).expand(tokens.size(0), -1)

    def step(_data, model):
        out = model(tokens, positions, None)
        return out, lambda o: (o.sum() * 0, {"out": o.detach()})

    with torch.no_grad():
        result = get_forward_backward_func()(forward_step_func=step, data_iterator=iter([None]), model=chunks,
                                             num_microbatches=1, seq_length=tokens.size(1),
                                             micro_batch_size=tokens.size(0), forward_only=True)
    return result[0]["out"] if result else None

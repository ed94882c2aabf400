"""Transformer-layer specs, chosen in one place: megatron-core local, transformer-engine, or torch SDPA.

- ``local``: megatron-core's own modules (`get_gpt_layer_local_spec`). Runs anywhere; the CPU default.
- ``te``: transformer-engine fused modules (`get_gpt_layer_with_transformer_engine_spec`); GPU only.
- ``sdpa``: the local spec with its core attention replaced by `SDPAttention`, which calls
  `torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels on GPUs without
  TE; also correct on CPU).
- ``auto``: te when transformer-engine imports and CUDA is present, else sdpa on CUDA, else local.
"""
from __future__ import annotations

import copy
import math

import torch

SPECS = ("auto", "local", "te", "sdpa")


def te_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - TE raises assorted errors when CUDA libraries are missing
        return False
    return True


def resolve(name: str) -> str:
    """The concrete spec for `name` on this machine; one-line error when it cannot run here."""
    if name not in SPECS:
        raise ValueError(f"unknown layer spec {name!r}; choose one of {', '.join(SPECS)}")
    if name == "auto":
        return "te" if te_available() else ("sdpa" if torch.cuda.is_available() else "local")
    if name == "te" and not te_available():
        raise ValueError("layer spec 'te' needs transformer-engine and a GPU; install the [gpu] extra or use 'sdpa'/'local'")
    return name


class SDPAttention(torch.nn.Module):
    """Drop-in core attention for megatron-core's `SelfAttention`: causal SDPA with native GQA.

    Same constructor and forward signature as `megatron.core.transformer.dot_product_attention.
    DotProductAttention`. Inputs are [seq, batch, heads, head_dim]; output is [seq, batch, heads·head_dim].
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__()
        self.config = config
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention supports plain causal attention only")
        from megatron.core import tensor_parallel

        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        dropout = self.dropout if self.training else 0.0
        with tensor_parallel.get_cuda_rng_tracker().fork():
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, is_causal=attention_mask is None, attn_mask=None if attention_mask is None
                else ~attention_mask, scale=self.softmax_scale, enable_gqa=k.size(1) != q.size(1))
        s, b = query.size(0), query.size(1)
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)  # [s, b, heads·d]


def layer_spec(name: str):
    """The megatron-core `ModuleSpec` of one transformer layer for spec `name` (after `resolve`)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    name = resolve(name)
    if name == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    if name == "sdpa":
        spec = copy.deepcopy(spec)
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


"""The four roles as megatron-core `GPTModel`s on the grid: actor, reference (LM head), critic, reward (value head).

`build_model` returns one GPTModel per virtual-pipeline chunk of this rank. The model files stay
architecture only: parallelism comes from the grid's megatron-core state, weights from `hf_io`, the
layer implementation from `specs`. Two small additions to GPTModel happen here and nowhere else:

- a value model's `output_layer` is a replicated `ValueHead` ([1, hidden], HF `score.weight`), so
  the model returns [batch, seq, 1] values instead of logits;
- an LM's padded vocab columns (Megatron pads the vocab to a multiple of divisor·tp) are set to
  -inf by a forward hook on `output_layer`, so padded rows are never sampled and never enter a loss
  or an entropy; their gradients are zero.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hybridflow_mg.models.hf_spec import ModelSpec, check_layout, rope_inv_freq
from hybridflow_mg.models.specs import layer_spec, resolve

ROLES = {"actor": "lm", "ref": "lm", "critic": "value", "reward": "value"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BuiltModel:
    """What the rest of the system needs to know about a built model (besides its modules)."""

    spec: ModelSpec
    role: str
    layer_spec: str
    """Resolved layer spec: local, te or sdpa."""
    padded_vocab: int
    dtype: torch.dtype

    @property
    def naming(self) -> str:
        """Which parameter names the layer spec gives (`layouts` spec "te" or "local")."""
        return "te" if self.layer_spec == "te" else "local"


class ValueHead(torch.nn.Module):
    """Replicated scalar head standing in for GPTModel's output layer: [s, b, h] → ([s, b, 1], None)."""

    sequence_parallel = False  # GPTModel reads this attribute in inference mode

    def __init__(self, hidden_size: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        # A head that is not loaded (a critic starting from the actor's weights) starts at zero:
        # initial values are 0, and the first updates come from the value loss alone.
        self.weight = torch.nn.Parameter(torch.zeros(1, hidden_size, dtype=dtype, device=device))

    def forward(self, hidden_states, weight=None, runtime_gather_output=None):
        return F.linear(hidden_states, self.weight), None


def _mask_padded_vocab(output_layer: torch.nn.Module, vocab_size: int, padded: int, tp_rank: int, tp: int) -> None:
    per_rank = padded // tp
    real = max(0, min(per_rank, vocab_size - tp_rank * per_rank))  # real columns in this rank's shard
    if real == per_rank:
        return

    def hook(_module, _inputs, output):
        logits, bias = output
        return logits.index_fill(-1, torch.arange(real, per_rank, device=logits.device), float("-inf")), bias

    output_layer.register_forward_hook(hook)


def _mark_tensor_parallel(chunks: list[torch.nn.Module], spec: ModelSpec, naming: str) -> None:
    """Set megatron-core's `tensor_model_parallel` attributes on every TP-split parameter.

    megatron-core sets them only inside its weight-initialisation functions, which do not run with
    `perform_initialization=False` (weights loaded from a checkpoint). Without them the grad-norm
    (`param_is_not_tensor_parallel_duplicate`) counts every split weight as a TP duplicate: clipping
    then sees the norm of TP rank 0's shards only.
    """
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    from hybridflow_mg.models.layouts import match, rules_for

    rules = rules_for(spec.dims)
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            found = match(rules, "mcore", name, spec=naming)
            rule = found[0] if found else (next(r for r in rules if r.key == "embedding")
                                           if name == "output_layer.weight" and spec.dims.tie_embeddings else None)
            if rule is not None and rule.dim is not None and not getattr(param, "tensor_model_parallel", False):
                set_tensor_model_parallel_attributes(param, True, rule.dim, 1)


def transformer_config(spec: ModelSpec, layout, dtype: torch.dtype, resolved_spec: str, *, init: bool,
                       dropout: float = 0.0, **overrides):
    """megatron-core `TransformerConfig` for this model on this layout (CPU-safe choices on CPU)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    on_gpu = torch.cuda.is_available()
    d = spec.dims
    kwargs = dict(
        num_layers=d.num_layers, hidden_size=d.hidden_size, num_attention_heads=d.num_heads,
        num_query_groups=d.num_kv_heads, kv_channels=d.head_dim, ffn_hidden_size=d.ffn_hidden_size,
        normalization="RMSNorm", layernorm_epsilon=spec.norm_eps, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=d.qkv_bias,
        hidden_dropout=dropout, attention_dropout=dropout,
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_cpu_initialization=not on_gpu, perform_initialization=init,
        # CPU: no fused CUDA kernels, no p2p device sync (see parallel/cpu_shims.py)
        batch_p2p_sync=on_gpu, masked_softmax_fusion=on_gpu and resolved_spec != "local",
        bias_activation_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False,
        attention_softmax_in_fp32=True, deallocate_pipeline_outputs=False,
        # vpp > 1 (the interleaved schedule) sends fixed shapes, unbatched; ModelWorker pads its micro-batches.
        # Variable lengths make each p2p call exchange shapes first and wait for that alone: there a stage
        # waits for its peer to take a grad's shape while the peer waits for it to take an activation, which
        # it posts only after that wait (a hang at num_microbatches == pp). And at pp=2 the prev and next
        # stage are one rank: batched p2p posts send_prev before send_next while the peer posts recv_prev
        # first, so an activation lands in a grad's buffer (wrong gradients); unbatched p2p keeps the order.
        variable_seq_lengths=layout.vpp == 1, batch_p2p_comm=layout.vpp == 1,
        moe_token_dispatcher_type="alltoall",  # dense models; only to satisfy the variable-length check
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def _place(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Every floating parameter in `dtype` and, on GPU, the model on this rank's CUDA device.

    Without TE or Apex, megatron-core's norms fall back to torch's (`WrappedTorchNorm`), which ignores
    `params_dtype` and `use_cpu_initialization`: their weights come out fp32 and on the CPU, where a
    bf16 GPU forward fails ("found at least two devices, cuda:0 and cpu", seen on an H200 with the
    SDPA spec). Roles without DDP (reference, reward model) are never moved by DDP's buffers, so
    placement is done here, once, for every role.
    """
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    if torch.cuda.is_available():
        model.to(torch.device("cuda", torch.cuda.current_device()))


def build_model(spec: ModelSpec, grid, *, role: str = "actor", layer_spec_name: str = "auto",
                dtype: torch.dtype | str = torch.float32, init: bool = False, dropout: float = 0.0,
                **config_overrides) -> tuple[list[torch.nn.Module], BuiltModel]:
    """GPTModel chunks for `role` on this rank, plus facts about them.

    `init=False` (the default) skips megatron-core's weight initialisation: weights come from
    `hf_io.load_weights` next. `init=True` draws them (tests, training from scratch).
    """
    from megatron.core.models.gpt import GPTModel

    if role not in ROLES:
        raise ValueError(f"unknown model role {role!r}; choose one of {', '.join(ROLES)}")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if (ROLES[role] == "value") != spec.is_value_model:
        raise ValueError(f"role {role!r} needs a {'value' if ROLES[role] == 'value' else 'language-model'} head; "
                         f"build the spec with head={ROLES[role]!r}")
    layout = grid.layout
    check_layout(spec, layout.tp, layout.pp, layout.vpp)
    resolved = resolve(layer_spec_name)
    config = transformer_config(spec, layout, dtype, resolved, init=init, dropout=dropout, **config_overrides)
    padded = spec.dims.padded_vocab("mcore", layout.tp)
    inv_freq = rope_inv_freq(spec)
    chunks = []
    for vp in range(layout.vpp):
        first = grid.is_first_stage and vp == 0
        last = grid.is_last_stage and vp == layout.vpp - 1
        model = GPTModel(
            config=config, transformer_layer_spec=layer_spec(resolved), vocab_size=padded,
            max_sequence_length=spec.max_position_embeddings, pre_process=first, post_process=last,
            share_embeddings_and_output_weights=spec.dims.tie_embeddings, position_embedding_type="rope",
            rotary_base=int(spec.rope_theta), vp_stage=vp if layout.vpp > 1 else None,
        )
        # rope exactly as transformers computes it (megatron-core's llama3 scaling fixes some factors)
        model.rotary_pos_emb.inv_freq = inv_freq.to(model.rotary_pos_emb.inv_freq.device)
        if last and spec.is_value_model:
            model.output_layer = ValueHead(spec.dims.hidden_size, dtype, next(model.parameters()).device)
        elif last:
            _mask_padded_vocab(model.output_layer, spec.dims.vocab_size, padded, grid.train.tp, layout.tp)
        _place(model, dtype)
        chunks.append(model)
    _mark_tensor_parallel(chunks, spec, "te" if resolved == "te" else "local")
    return chunks, BuiltModel(spec=spec, role=role, layer_spec=resolved, padded_vocab=padded, dtype=dtype)

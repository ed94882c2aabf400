"""How every parameter is named, split and padded in each format: the data half of the resharder.

Three formats hold the same weights:

- ``hf``: transformers Llama / Qwen2 / Mistral (``*ForCausalLM``, or ``*ForSequenceClassification``
  for a critic / reward model). Full tensors, separate q/k/v and gate/up.
- ``mcore``: megatron-core ``GPTModel``, tensor-parallel shards, for both layer specs. The local
  spec (``get_gpt_layer_local_spec``) has ``input_layernorm`` / ``pre_mlp_layernorm`` modules; the
  TE spec (``get_gpt_layer_with_transformer_engine_spec``) fuses those norms into the following
  linear (``TELayerNormColumnParallelLinear``), so they are named ``linear_qkv.layer_norm_weight`` /
  ``linear_fc1.layer_norm_weight`` (the local spec's ``sharded_state_dict_keys_map`` maps its names
  onto these in checkpoints). All other names are the same in both specs.
- ``vllm``: vLLM's per-rank parameters (``LlamaForCausalLM``, ``Qwen2ForCausalLM``;
  ``MistralForCausalLM`` subclasses the Llama classes), with fused ``qkv_proj`` and ``gate_up_proj``.

Every logical parameter has one *canonical* tensor: the concatenation of its HF source tensors
along dim 0 (qkv = cat(q, k, v); gate_up = cat(gate, up); otherwise the single HF tensor). The
canonical tensor never contains vocab padding. A `ParamRule` says which HF tensors form it, what it
is called in each format, which dim is split across TP ranks and how (`kind`). The mechanics — one
row map per (rule, format, tp size, rank) and index_select / scatter with it — live in
`hybridflow_mg.models.rowmaps`. This module imports no torch, so planners can use it anywhere.

Layer templates. Per-layer names contain ``{i}``. Fill it with the index the target state dict
uses: the *global* layer index for HF, vLLM (its ``make_layers`` keeps global indices and puts
``PPMissingLayer`` placeholders on other stages) and Megatron checkpoints (``sharded_state_dict``);
the *stage-local* index for the ``named_parameters()`` of a live Megatron module, whose
``decoder.layers`` holds only its own layers. `global_layer` / `layer_location` convert.

Facts, and where they were read (megatron-core 0.16.1, vLLM 0.32, transformers 5.19):

- Megatron vocab: ``VocabParallelEmbedding`` / ``output_layer`` split the vocab evenly
  (``tensor_parallel.utils.VocabUtility``, ``divide`` asserts); megatron-core pads nothing itself, so
  we pad like Megatron-LM: to a multiple of ``vocab_divisor · tp`` (`mcore_padded_vocab`).
- vLLM vocab: ``layers/vocab_parallel_embedding.py``: ``pad_vocab_size`` rounds up to
  ``DEFAULT_VOCAB_PADDING_SIZE = 64`` (``VocabParallelEmbedding`` and ``ParallelLMHead`` alike), then
  ``divide(padded, tp)`` rows per rank in rank order; ``weight_loader`` zero-fills the padding rows.
- vLLM qkv: ``layers/linear.py`` ``QKVParallelLinear``: per rank ``[Q; K; V]`` of ``heads/tp`` query
  heads; when ``tp >= num_kv_heads`` each rank has one KV head and ``num_kv_head_replicas =
  tp / num_kv_heads`` (``divide`` asserts), loading kv head ``tp_rank // num_kv_head_replicas``.
- vLLM gate_up: ``MergedColumnParallelLinear.weight_loader``: each of gate / up is split evenly,
  rank r gets ``[gate_r; up_r]``. ``RowParallelLinear``: dim 1 split evenly.
- Megatron qkv: ``transformer/attention.py`` ``SelfAttention.get_query_key_value_tensors`` views the
  output as ``[num_query_groups, (q_per_group + 2) · head_dim]``: per group its query heads, then its
  K head, then its V head; ``ColumnParallelLinear`` gives rank r a contiguous row range. 0.16.1 also
  runs ``num_query_groups < tp`` (with an all-gather of the qkv output every layer); we reject it.
- Megatron fc1: ``transformer/mlp.py`` ``glu`` chunks each rank's output in two: ``[gate_r; up_r]``.
- Megatron layer numbering: ``transformer_layer.get_transformer_layer_offset`` (even split, no
  ``pipeline_model_parallel_layout``, no first/last-stage overrides): chunk ``c`` of stage ``r``
  starts at ``(c · pp + r) · num_layers / (pp · vpp)``.
- vLLM's seq-cls adapter (``models/adapters.py``) holds the score head as a ``ReplicatedLinear``
  named ``score``; HF ``GenericForSequenceClassification`` names it ``score`` (``[num_labels, hidden]``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

FORMATS = ("hf", "mcore", "vllm")
SHARDED_FORMATS = ("mcore", "vllm")
SPECS = ("local", "te")
KINDS = ("plain", "qkv", "gate_up", "vocab")
HEADS = ("lm", "value")


# --- vocab padding ---------------------------------------------------------------------------------
def mcore_padded_vocab(vocab_size: int, tp: int, divisor: int = 128) -> int:
    """Megatron-LM's rule: round the vocab up to a multiple of ``divisor · tp``.

    It depends on tp, so the padded size (and which rows are padding) differs between tp sizes;
    the canonical tensor is unpadded, which is why conversions go through it.
    """
    multiple = divisor * tp
    return -(-vocab_size // multiple) * multiple


def vllm_padded_vocab(vocab_size: int, padding: int = 64) -> int:
    """vLLM's ``pad_vocab_size``: round up to a multiple of ``padding`` (64), independent of tp."""
    return -(-vocab_size // padding) * padding


# --- model dimensions ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelDims:
    """The sizes that decide every parameter's shape, split and padding."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    """Real tokens (HF ``vocab_size``); padded rows above it are never tokens."""
    tie_embeddings: bool = False
    """Output layer shares the embedding: no output rule. Ignored when ``head="value"``."""
    qkv_bias: bool = False
    """q/k/v projections have biases (Qwen2)."""
    head: str = "lm"
    """``"lm"``: output layer over the vocab (actor, reference); ``"value"``: a replicated
    ``[1, hidden]`` scalar head (critic, reward model; HF ``score.weight``)."""
    vocab_divisor: int = 128
    """Megatron pads the vocab to a multiple of ``vocab_divisor · tp`` (Megatron-LM's
    ``make_vocab_size_divisible_by``)."""
    vllm_vocab_padding: int = 64
    """vLLM pads the vocab to a multiple of this (``DEFAULT_VOCAB_PADDING_SIZE``)."""

    def __post_init__(self):
        for key in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                    "ffn_hidden_size", "vocab_size", "vocab_divisor", "vllm_vocab_padding"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model dim {key}={value!r} must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head not in HEADS:
            raise ValueError(f"head={self.head!r} must be one of {HEADS}")

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def extent(self, key: str) -> int:
        """Size of a named extent used in `ParamRule.parts` / `trailing`."""
        sizes = {"hidden": self.hidden_size, "q": self.num_heads * self.head_dim,
                 "kv": self.num_kv_heads * self.head_dim, "ffn": self.ffn_hidden_size,
                 "vocab": self.vocab_size, "one": 1}
        return sizes[key]

    def padded_vocab(self, fmt: str, tp: int) -> int:
        """Rows of the vocab-parallel tensors over all ``tp`` ranks in ``fmt`` (padding included)."""
        if fmt == "mcore":
            return mcore_padded_vocab(self.vocab_size, tp, self.vocab_divisor)
        if fmt == "vllm":
            return vllm_padded_vocab(self.vocab_size, self.vllm_vocab_padding)
        if fmt == "hf":
            return self.vocab_size
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")


def check_split(dims: ModelDims, fmt: str, tp: int) -> None:
    """Raise a one-line ValueError when ``fmt`` cannot shard this model over ``tp`` ranks."""
    if fmt not in SHARDED_FORMATS:
        raise ValueError(f"format {fmt!r} is not sharded; expected one of {SHARDED_FORMATS}")
    if not isinstance(tp, int) or tp <= 0:
        raise ValueError(f"tp={tp!r} must be a positive integer")
    if dims.num_heads % tp:
        raise ValueError(f"num_heads={dims.num_heads} is not divisible by tp={tp}; choose tp dividing {dims.num_heads}")
    if fmt == "mcore" and dims.num_kv_heads % tp:
        raise ValueError(f"num_kv_heads={dims.num_kv_heads} is not divisible by megatron tp={tp} "
                         f"(each rank must hold whole KV groups); choose tp dividing {dims.num_kv_heads}")
    if fmt == "vllm" and (tp % dims.num_kv_heads if tp >= dims.num_kv_heads else dims.num_kv_heads % tp):
        raise ValueError(f"vllm tp={tp} and num_kv_heads={dims.num_kv_heads}: one must divide the other")
    if dims.ffn_hidden_size % tp:
        raise ValueError(f"ffn_hidden_size={dims.ffn_hidden_size} is not divisible by tp={tp}")
    padded = dims.padded_vocab(fmt, tp)
    if padded % tp:
        raise ValueError(f"{fmt} padded vocab {padded} (vocab_size={dims.vocab_size}) is not divisible by tp={tp}")


# --- pipeline layer numbering ----------------------------------------------------------------------
def check_pp(num_layers: int, pp: int, vpp: int = 1) -> None:
    if pp <= 0 or vpp <= 0:
        raise ValueError(f"pp={pp}, vpp={vpp} must be positive integers")
    if num_layers % (pp * vpp):
        raise ValueError(f"num_layers={num_layers} is not divisible by pp·vpp = {pp}·{vpp} = {pp * vpp}")


def global_layer(pp_rank: int, local: int, num_layers: int, pp: int = 1, vpp: int = 1, vpp_chunk: int = 0) -> int:
    """Global index of layer ``local`` of virtual chunk ``vpp_chunk`` on pipeline stage ``pp_rank``.

    megatron-core's even split: global chunk ``vpp_chunk · pp + pp_rank`` of ``num_layers / (pp·vpp)``
    layers each (``get_transformer_layer_offset``).
    """
    check_pp(num_layers, pp, vpp)
    per_chunk = num_layers // (pp * vpp)
    if not (0 <= pp_rank < pp and 0 <= vpp_chunk < vpp and 0 <= local < per_chunk):
        raise ValueError(f"pp_rank={pp_rank}, vpp_chunk={vpp_chunk}, local={local} outside "
                         f"pp={pp}, vpp={vpp}, {per_chunk} layers per chunk")
    return (vpp_chunk * pp + pp_rank) * per_chunk + local


def layer_location(layer: int, num_layers: int, pp: int = 1, vpp: int = 1) -> tuple[int, int, int]:
    """Inverse of `global_layer`: ``(pp_rank, vpp_chunk, local)`` holding global ``layer``."""
    check_pp(num_layers, pp, vpp)
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} outside 0..{num_layers - 1}")
    per_chunk = num_layers // (pp * vpp)
    chunk, local = divmod(layer, per_chunk)
    return chunk % pp, chunk // pp, local


def check_gen_pp(num_layers: int, gen_pp: int, name: str = "gen pp", of: str = "") -> None:
    """One line when `gen_pp` vLLM stages cannot split `num_layers` evenly (vLLM's ``get_pp_indices`` then
    hands the remainder to the middle stages, which the resharder does not write); `name` is the option
    the user set, `of` says whose layers (e.g. " of model.path (DIR)")."""
    if gen_pp <= 0 or num_layers % gen_pp:
        fits = ", ".join(str(k) for k in range(1, num_layers + 1) if num_layers % k == 0)
        raise ValueError(f"{name}={gen_pp} does not divide the {num_layers} layers{of} (vLLM would split them "
                         f"unevenly); pick one of {fits}")


def vllm_stage_holds(rule: "ParamRule", layer: int | None, dims: ModelDims, gen_pp: int, stage: int) -> bool:
    """Whether vLLM's pipeline stage ``stage`` of ``gen_pp`` has a parameter for (rule, layer).

    vLLM 0.32 ``model_executor/models/llama.py``: ``make_layers`` builds layers
    ``get_pp_indices(num_layers, stage, gen_pp)`` (an even split; we refuse uneven ones, where vLLM
    hands the remainder to the middle stages) and ``PPMissingLayer`` elsewhere; ``embed_tokens`` lives
    on the first stage, and on the last too when the embeddings are tied (the LM head shares it);
    ``norm`` and ``lm_head`` on the last stage.
    """
    check_gen_pp(dims.num_layers, gen_pp)
    if rule.per_layer:
        return layer // (dims.num_layers // gen_pp) == stage
    if rule.key == "embedding":
        return stage == 0 or (dims.tie_embeddings and stage == gen_pp - 1)
    return stage == gen_pp - 1  # final norm, output layer


# --- per-parameter rules ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamRule:
    """One logical parameter: its names in every format and how it is split.

    ``{i}`` in a name is the layer index (see the module docstring). A format name of ``None`` means
    the parameter does not exist there.
    """

    key: str
    """Logical name, unique within a model: ``"qkv"``, ``"fc1"``, ``"embedding"`` …"""
    hf: tuple[str, ...]
    """HF source names; their concatenation along dim 0 is the canonical tensor."""
    mcore: str | None
    """megatron-core name with the local layer spec."""
    vllm: str | None
    kind: str = "plain"
    """``plain``: contiguous split (or replicated); ``qkv``: head-group permutation; ``gate_up``:
    gate and up split separately; ``vocab``: contiguous split of the padded vocab."""
    dim: int | None = None
    """Tensor-parallel split dim: ``None`` replicated, 0 column-parallel (rows), 1 row-parallel."""
    parts: tuple[str, ...] = ("hidden",)
    """Extent (a `ModelDims.extent` key) of each HF source along dim 0."""
    trailing: tuple[str, ...] = ()
    """Extents of the remaining dims, shared by all sources."""
    mcore_te: str | None = None
    """megatron-core name with the TE layer spec, where it differs from ``mcore``."""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"rule {self.key}: kind={self.kind!r} must be one of {KINDS}")
        if len(self.parts) != len(self.hf):
            raise ValueError(f"rule {self.key}: {len(self.hf)} HF sources but {len(self.parts)} parts")
        if self.dim is not None and self.dim > len(self.trailing):
            raise ValueError(f"rule {self.key}: split dim {self.dim} but the tensor has {1 + len(self.trailing)} dims")

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf[0]

    @property
    def index_dim(self) -> int:
        """The dim a row map indexes: the split dim, or 0 for a replicated tensor."""
        return 0 if self.dim is None else self.dim


_HL = "model.layers.{i}."  # HF and vLLM layer prefix
_ML = "decoder.layers.{i}."  # megatron-core layer prefix

# The whole table. `rules_for` picks the rows a model has; nothing else in the project names params.
RULES: tuple[ParamRule, ...] = (
    ParamRule("embedding", ("model.embed_tokens.weight",), "embedding.word_embeddings.weight",
              "model.embed_tokens.weight", kind="vocab", dim=0, parts=("vocab",), trailing=("hidden",)),
    ParamRule("input_norm", (_HL + "input_layernorm.weight",), _ML + "input_layernorm.weight",
              _HL + "input_layernorm.weight", mcore_te=_ML + "self_attention.linear_qkv.layer_norm_weight"),
    ParamRule("qkv", tuple(_HL + f"self_attn.{p}_proj.weight" for p in "qkv"),
              _ML + "self_attention.linear_qkv.weight", _HL + "self_attn.qkv_proj.weight",
              kind="qkv", dim=0, parts=("q", "kv", "kv"), trailing=("hidden",)),
    ParamRule("qkv_bias", tuple(_HL + f"self_attn.{p}_proj.bias" for p in "qkv"),
              _ML + "self_attention.linear_qkv.bias", _HL + "self_attn.qkv_proj.bias",
              kind="qkv", dim=0, parts=("q", "kv", "kv")),
    ParamRule("proj", (_HL + "self_attn.o_proj.weight",), _ML + "self_attention.linear_proj.weight",
              _HL + "self_attn.o_proj.weight", dim=1, parts=("hidden",), trailing=("q",)),
    ParamRule("mlp_norm", (_HL + "post_attention_layernorm.weight",), _ML + "pre_mlp_layernorm.weight",
              _HL + "post_attention_layernorm.weight", mcore_te=_ML + "mlp.linear_fc1.layer_norm_weight"),
    ParamRule("fc1", (_HL + "mlp.gate_proj.weight", _HL + "mlp.up_proj.weight"), _ML + "mlp.linear_fc1.weight",
              _HL + "mlp.gate_up_proj.weight", kind="gate_up", dim=0, parts=("ffn", "ffn"), trailing=("hidden",)),
    ParamRule("fc2", (_HL + "mlp.down_proj.weight",), _ML + "mlp.linear_fc2.weight",
              _HL + "mlp.down_proj.weight", dim=1, parts=("hidden",), trailing=("ffn",)),
    ParamRule("final_norm", ("model.norm.weight",), "decoder.final_layernorm.weight", "model.norm.weight"),
    ParamRule("output", ("lm_head.weight",), "output_layer.weight", "lm_head.weight",
              kind="vocab", dim=0, parts=("vocab",), trailing=("hidden",)),
    # Critic / reward head: models/build.py puts a replicated [1, hidden] `ValueHead` in place of
    # GPTModel's output_layer on the last stage, so it keeps GPTModel's name for the head.
    ParamRule("value_head", ("score.weight",), "output_layer.weight", "score.weight",
              parts=("one",), trailing=("hidden",)),
)
RULES_BY_KEY = {rule.key: rule for rule in RULES}


def rules_for(dims: ModelDims) -> list[ParamRule]:
    """The rules of one model, in HF state-dict order. Per-layer rules appear once, templated."""
    skip = set()
    if not dims.qkv_bias:
        skip.add("qkv_bias")
    if dims.head == "value" or dims.tie_embeddings:
        skip.add("output")
    if dims.head != "value":
        skip.add("value_head")
    return [rule for rule in RULES if rule.key not in skip]


def canonical_shape(rule: ParamRule, dims: ModelDims) -> tuple[int, ...]:
    return (sum(dims.extent(p) for p in rule.parts), *(dims.extent(t) for t in rule.trailing))


def hf_shapes(rule: ParamRule, dims: ModelDims) -> list[tuple[int, ...]]:
    trailing = tuple(dims.extent(t) for t in rule.trailing)
    return [(dims.extent(p), *trailing) for p in rule.parts]


# --- names -----------------------------------------------------------------------------------------
def _template(rule: ParamRule, fmt: str, spec: str) -> str | None:
    if spec not in SPECS:
        raise ValueError(f"spec={spec!r} must be one of {SPECS}")
    if fmt == "mcore":
        return rule.mcore_te if spec == "te" and rule.mcore_te else rule.mcore
    if fmt == "vllm":
        return rule.vllm
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")


def _fill(rule: ParamRule, template: str, layer: int | None) -> str:
    if rule.per_layer != (layer is not None):
        raise ValueError(f"rule {rule.key} is {'' if rule.per_layer else 'not '}per layer; "
                         f"{'pass' if rule.per_layer else 'do not pass'} a layer index")
    return template.format(i=layer) if rule.per_layer else template


def hf_names(rule: ParamRule, layer: int | None = None) -> tuple[str, ...]:
    return tuple(_fill(rule, t, layer) for t in rule.hf)


def name(rule: ParamRule, fmt: str, layer: int | None = None, spec: str = "local") -> str | None:
    """The parameter's name in ``fmt`` (``None`` if absent there). ``spec`` picks the Megatron spec.

    For ``hf`` only single-source rules have one name; use `hf_names` for qkv and gate_up.
    """
    if fmt == "hf":
        if len(rule.hf) != 1:
            raise ValueError(f"rule {rule.key} has {len(rule.hf)} HF sources; use hf_names()")
        return _fill(rule, rule.hf[0], layer)
    template = _template(rule, fmt, spec)
    return None if template is None else _fill(rule, template, layer)


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(\d+)") + "$")


def match(rules: list[ParamRule], fmt: str, param_name: str, spec: str = "local") -> tuple[ParamRule, int | None, int] | None:
    """Which rule a name belongs to: ``(rule, layer or None, HF source position)``, or ``None``.

    The position says which of the HF sources (q/k/v, gate/up) the name is; 0 in other formats.
    """
    for rule in rules:
        templates = rule.hf if fmt == "hf" else (_template(rule, fmt, spec),)
        for part, template in enumerate(templates):
            found = template is not None and _pattern(template).match(param_name)
            if found:
                return rule, (int(found.group(1)) if rule.per_layer else None), part
    return None

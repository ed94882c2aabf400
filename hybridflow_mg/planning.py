"""Per-GPU memory and reshard traffic of one RL setup, from an HF config and two layouts: pure arithmetic.

No torch here: parameter counts come from the `models.layouts` rules (the same table the resharder and
HF import run on), traffic from `parallel.layout.ParallelLayout.recv_fraction` (the numbers `grid` prints).
Placement: above `parallel/` and `models/`, below `commands/`; `planning_search` (plan --search) builds on it.

Memory model, per GPU, at the moment generation runs (everything below is resident then):

- Actor on the training layout (Megatron, t·p·d): weights in the params dtype; gradients in fp32
  (megatron DDP's ``grad_reduce_in_fp32``; ``grad_dtype`` = params dtype turns that off); Adam states
  = fp32 master copy (none when params are fp32) + two fp32 moments, i.e. 12 (or 8) bytes per
  parameter, divided by d under the distributed optimizer. The grad buffer is never sharded.
  Buffer padding to multiples of d is ignored (a few MB).
- Exact shard sizes per pipeline stage: TP-split tensors divided by t (Megatron pads the vocab to a
  multiple of 128·t), norms whole, the embedding on the first stage, final norm and output layer on
  the last. Tied embeddings with p > 1: megatron-core's last stage still allocates ``output_layer.weight``
  (a copy of the embedding kept equal by an all-reduce), so it is counted there.
- Generation weights: vLLM's per-rank shard for t_g: qkv with KV heads replicated when t_g > kv heads,
  vocab padded to a multiple of 64, tied lm_head sharing the embedding. With p_g stages each holds
  what `models.layouts.vllm_stage_holds` says (L/p_g layers; the embedding on the first stage and, tied,
  on the last too; final norm and LM head on the last), and every GPU is charged the largest stage's
  shard: an upper bound by at most the vocab rows and a norm, since which training stage runs which
  vLLM stage is not followed here. HybridFlow builds the generation shard around the training shard (redundant
  copy 0, peak weights M/(t_g·p_g)); our vLLM parameters are separate tensors, so the training shard
  and the generation shard both live, and the training shard is the extra we pay.
- Critic (``with_critic``): the same trunk with a replicated ``[1, hidden]`` value head instead of the
  output layer, with its own gradients and optimizer states. Reference (``with_ref``): actor weights
  only. Both on the training layout of the same GPUs. Nothing is offloaded.
- Reserve, taken out of what is left before the KV cache (unless ``reserve_gib`` replaces it):
  ``OVERHEAD_GIB`` for CUDA context, cuBLAS / NCCL workspaces and allocator fragmentation (an
  allowance, not a measurement) plus the training activations of the actor's forward-backward —
  the KV cache is sized so that they fit beside it. Saved 16-bit activations per token per layer,
  with flash attention (no s² scores): attention keeps the norm input, the qkv input, q/k/v and the
  attention output, 2h + 2·heads·head_dim + 2·kv_heads·head_dim values; the SwiGLU MLP keeps the norm
  input, the fc1 input, fc1's [gate; up] output and fc2's input, 2h + 3·ffn values (≈ 34·h bytes for
  Llama-3-70B, matching Korthikanti et al. 2022). Without sequence parallelism (the trainer's case)
  the 4h of norm and linear inputs are whole on every TP rank and the rest is split over t; with it,
  everything is split over t. Stage s of a 1F1B pipeline holds p − s micro-batches of its L/p
  layers (at least p micro-batches per step; interleaving: × (1 + (p−1)/(p·vpp))); the last stage
  also keeps two fp32 copies of its logits shard (the log-prob and its gradient). The critic updates
  after the actor; its peak (no vocab logits) is smaller. With vLLM sleep mode the KV cache is freed
  during training, so the two take turns: ``tokens_per_replica_if_sleeping`` drops the activations
  from the reserve.
- KV cache per token per rank: 2 (K and V) · L/p_g layers · max(1, kv_heads/t_g) · head_dim · bytes (a
  stage caches its own layers only). A generation replica's t_g·p_g ranks each hold every token's
  slice, so the rank with the least room sets the tokens per replica.

Traffic per rank for one reshard: `recv_fraction(rank)` · M with M the model's bytes in the generation
dtype (unpadded parameters); (d_g − 1)/(t·p)·M whenever t_g | t. Ideal time = received bytes / bus
bandwidth (NCCL's bus bandwidth makes an all-gather's time exactly that), over NVLink when the ranks
the rank gathers from (its micro-DP group when t_g | t, see `sources`) lie inside one node (ranks r
with the same r // gpus_per_node, as launchers place them), else over InfiniBand (one NIC per GPU).
Baselines from DESIGN.md §2: gather everything over all t·p·d ranks, and HybridFlow-V (all-gather
over the training replica of t·p ranks).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from fractions import Fraction
from math import prod

from hybridflow_mg.parallel.layout import ParallelLayout
from hybridflow_mg.models.hf_spec import ModelSpec, check_layout
from hybridflow_mg.models.layouts import (RULES_BY_KEY, ModelDims, ParamRule, canonical_shape, check_gen_pp, check_split,
                                          rules_for, vllm_stage_holds)

GIB = 2**30
GB = 10**9
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
OVERHEAD_GIB = 2.0
"""CUDA context, cuBLAS / NCCL workspaces and allocator fragmentation: an allowance per GPU."""
VLLM_OVERHEAD_GIB = 1.0
"""What vLLM keeps of its own budget besides weights and KV cache (its activations, sampler): an allowance."""


# --- parameter counts ------------------------------------------------------------------------------
def shard_numel(rule: ParamRule, fmt: str, dims: ModelDims, tp: int) -> int:
    """Elements of one rank's shard in ``fmt`` ("mcore" or "vllm"); a torch-free `rowmaps.shard_shape`."""
    shape = list(canonical_shape(rule, dims))
    if rule.dim is None:
        return prod(shape)
    if rule.kind == "qkv":
        replicated_kv = fmt == "vllm" and tp >= dims.num_kv_heads  # vLLM: one (replicated) KV head per rank
        kv = 1 if replicated_kv else dims.num_kv_heads // tp
        shape[0] = (dims.num_heads // tp + 2 * kv) * dims.head_dim
    elif rule.kind == "vocab":
        shape[0] = dims.padded_vocab(fmt, tp) // tp
    else:  # plain split, and gate_up (gate and up each split: 2·ffn/tp rows)
        shape[rule.dim] //= tp
    return prod(shape)


def stage_numel(dims: ModelDims, fmt: str, tp: int, pp: int, stage: int) -> int:
    """Parameters on one rank of pipeline stage ``stage`` (every TP rank of a stage holds the same):
    megatron-core's stages for "mcore", vLLM's (`models.layouts.vllm_stage_holds`) for "vllm"."""
    check_split(dims, fmt, tp)
    rules = rules_for(dims)
    if fmt == "vllm":
        def copies(rule: ParamRule) -> int:
            if rule.per_layer:
                return sum(vllm_stage_holds(rule, i, dims, pp, stage) for i in range(dims.num_layers))
            return int(vllm_stage_holds(rule, None, dims, pp, stage))

        return sum(shard_numel(rule, fmt, dims, tp) * copies(rule) for rule in rules)
    per_layer = sum(shard_numel(r, fmt, dims, tp) for r in rules if r.per_layer)
    total = per_layer * (dims.num_layers // pp)
    first, last = stage == 0, stage == pp - 1
    for rule in rules:
        if not rule.per_layer and (first if rule.key == "embedding" else last):
            total += shard_numel(rule, fmt, dims, tp)
    if fmt == "mcore" and dims.tie_embeddings and dims.head == "lm" and pp > 1 and last:
        total += shard_numel(RULES_BY_KEY["embedding"], fmt, dims, tp)  # megatron-core's output_layer copy
    return total


@functools.lru_cache(maxsize=None)  # plan --search asks for the same few generation layouts many times
def gen_stage_numels(dims: ModelDims, gen_tp: int, gen_pp: int) -> tuple[int, ...]:
    """Parameters on one rank of each of vLLM's ``gen_pp`` stages at ``gen_tp``; a rank is charged the largest."""
    return tuple(stage_numel(dims, "vllm", gen_tp, gen_pp, s) for s in range(gen_pp))


def check_gen_split(dims: ModelDims, gen_tp: int, gen_pp: int) -> None:
    """One line when vLLM cannot split the model over the generation layout (heads, ffn, vocab over gen tp;
    layers over gen pp, evenly: vLLM hands a remainder to the middle stages, which the resharder does not
    write)."""
    check_split(dims, "vllm", gen_tp)
    check_gen_pp(dims.num_layers, gen_pp, "generation pp", " of the model (--gen pp=, parallel.gen.pp)")


def model_numel(dims: ModelDims) -> int:
    """All parameters, unpadded, each once (tied embeddings counted once)."""
    return sum(prod(canonical_shape(r, dims)) * (dims.num_layers if r.per_layer else 1) for r in rules_for(dims))


def critic_dims(dims: ModelDims) -> ModelDims:
    return dataclasses.replace(dims, head="value", tie_embeddings=False)


# --- options ---------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class PlanOptions:
    """What the plan assumes beyond the model and the layouts."""

    params_dtype: str = "bf16"
    """Training weights (Megatron ``params_dtype``)."""
    grad_dtype: str = "fp32"
    """Gradient buffers: fp32 (``grad_reduce_in_fp32``, megatron's default with 16-bit params) or the params dtype."""
    gen_dtype: str | None = None
    """vLLM weights and M for traffic; default: the params dtype."""
    kv_dtype: str | None = None
    """KV cache; default: the generation dtype."""
    distributed_optimizer: bool = True
    """Shard Adam states (and the fp32 master copy) over the d data-parallel ranks."""
    with_critic: bool = False
    """A critic (trunk + scalar head) with gradients and optimizer states on the same GPUs."""
    with_ref: bool = False
    """A reference model (actor weights only) on the same GPUs."""
    gpu_memory_gib: float = 80.0
    """Memory of one GPU."""
    reserve_gib: float | None = None
    """Replaces the activation + overhead estimate kept out of the KV cache (see the module docstring)."""
    seq_len: int = 4096
    """Tokens per training sequence (prompt + response), for the activation estimate."""
    micro_batch: int = 1
    """Sequences per training micro-batch, for the activation estimate."""
    gpus_per_node: int = 8
    """Consecutive ranks per node; a micro-DP group inside one node uses NVLink."""
    sleep_mode: bool = False
    """vLLM sleep mode: the KV cache is freed while training, so activations and KV cache take turns
    instead of sharing the GPU (`rollout.enable_sleep_mode`)."""
    offload_during_rollout: bool = False
    """With sleep mode: the training state (weights, gradients, optimizer states of every role) waits in
    host memory while vLLM generates (`trainer.offload_during_rollout`), so the KV cache gets its room."""
    min_kv_tokens: int = 1
    """The plan fits only when a generation replica's KV cache holds this many tokens (one sequence of
    the run's longest prompt + response: vLLM refuses to start with less)."""
    sequence_parallel: bool = False
    """megatron-core sequence parallelism (every saved activation split over t). The trainer does not
    turn it on, so by default the norm inputs and the inputs of qkv and fc1 are whole on every TP rank."""
    gpu_memory_utilization: float | None = None
    """vLLM's budget (weights, KV cache, its own activations) as a fraction of the GPU. vLLM refuses to
    start unless that much is free when the engine is built, which is after the training models; the
    KV cache gets what the budget leaves. None: no vLLM budget (the KV cache takes what is left)."""
    nvlink_gbps: float = 370.0
    """NVLink NCCL bus bandwidth, GB/s."""
    ib_gbps: float = 50.0
    """InfiniBand bandwidth per GPU (one NIC each), GB/s."""

    def __post_init__(self):
        for key in ("params_dtype", "grad_dtype", "gen_dtype", "kv_dtype"):
            value = getattr(self, key)
            if value is not None and value not in DTYPE_BYTES:
                raise ValueError(f"{key}={value!r} is not one of {', '.join(DTYPE_BYTES)}")
        if self.params_dtype == "fp8":
            raise ValueError("params_dtype fp8 is not supported; use bf16, fp16 or fp32")
        if self.grad_dtype not in ("fp32", self.params_dtype):
            raise ValueError(f"grad_dtype={self.grad_dtype!r}: megatron keeps gradients in fp32 "
                             f"(grad_reduce_in_fp32) or in the params dtype ({self.params_dtype})")
        for key in ("gpu_memory_gib", "nvlink_gbps", "ib_gbps", "seq_len", "micro_batch", "gpus_per_node"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}={getattr(self, key)!r} must be positive")
        if self.reserve_gib is not None and self.reserve_gib < 0:
            raise ValueError(f"reserve_gib={self.reserve_gib!r} must be 0 or more")

    def bytes_of(self, key: str) -> int:
        gen = self.gen_dtype or self.params_dtype
        dtype = {"params": self.params_dtype, "grad": self.grad_dtype, "gen": gen, "kv": self.kv_dtype or gen}[key]
        return DTYPE_BYTES[dtype]


# --- memory ----------------------------------------------------------------------------------------
def _trained(numel: int, layout: ParallelLayout, opt: PlanOptions) -> dict[str, int]:
    """Weights, gradients and Adam states of one trained model shard."""
    per_param = (4 if opt.params_dtype != "fp32" else 0) + 8  # fp32 master copy + two fp32 moments
    states = numel * per_param
    return {"weights": numel * opt.bytes_of("params"), "grads": numel * opt.bytes_of("grad"),
            "optimizer": -(-states // layout.dp) if opt.distributed_optimizer else states}


def activation_bytes(dims: ModelDims, layout: ParallelLayout, stage: int, opt: PlanOptions) -> int:
    """Saved training activations of the actor on `stage` (see the module docstring for the model)."""
    q, kv = dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim
    whole = 4 * dims.hidden_size  # the two norm inputs, qkv's and fc1's inputs: replicated over TP without SP
    split = 2 * q + 2 * kv + 3 * dims.ffn_hidden_size  # q, k, v, attention out; [gate; up], fc2 in: split over t
    per_token_layer = (Fraction(whole + split, layout.tp) if opt.sequence_parallel
                       else whole + Fraction(split, layout.tp)) * opt.bytes_of("params")  # in the params dtype
    tokens = opt.seq_len * opt.micro_batch
    in_flight = Fraction(layout.pp - stage)
    if layout.vpp > 1:
        in_flight *= 1 + Fraction(layout.pp - 1, layout.pp * layout.vpp)
    layers = dims.num_layers // layout.pp
    total = per_token_layer * tokens * layers * in_flight
    if stage == layout.pp - 1:
        total += 2 * 4 * tokens * dims.padded_vocab("mcore", layout.tp) // layout.tp
    return int(total)


def stage_memory(spec: ModelSpec, layout: ParallelLayout, opt: PlanOptions, stage: int) -> dict:
    """Bytes per GPU on one pipeline stage: every resident component and the reserve."""
    dims = spec.dims
    actor = stage_numel(dims, "mcore", layout.tp, layout.pp, stage)
    gen = max(gen_stage_numels(dims, layout.gen_tp, layout.gen_pp))
    parts = {f"actor_{k}": v for k, v in _trained(actor, layout, opt).items()}
    parts["gen_weights"] = gen * opt.bytes_of("gen")
    numel = {"actor": actor, "gen": gen}
    if opt.with_ref:
        parts["ref_weights"] = actor * opt.bytes_of("params")
    if opt.with_critic:
        numel["critic"] = stage_numel(critic_dims(dims), "mcore", layout.tp, layout.pp, stage)
        parts.update({f"critic_{k}": v for k, v in _trained(numel["critic"], layout, opt).items()})
    resident = sum(parts.values())
    if opt.reserve_gib is None:
        activations = activation_bytes(dims, layout, stage, opt)
        reserve = activations + int(OVERHEAD_GIB * GIB)
    else:
        activations, reserve = None, int(opt.reserve_gib * GIB)
    gpu = int(opt.gpu_memory_gib * GIB)
    overhead = reserve - (activations or 0)
    training_state = resident - parts["gen_weights"]
    if opt.sleep_mode:  # KV cache and activations take turns; with offload the training state leaves too
        generation = parts["gen_weights"] + overhead + (0 if opt.offload_during_rollout else training_state)
        training = training_state + (activations or 0) + overhead
    else:  # the KV cache stays allocated through training: sized to what is left beside everything
        generation = training = resident + reserve
    kv_cache = gpu - generation
    phases = {"training": training, "switch": resident + overhead}
    if opt.gpu_memory_utilization is not None:  # vLLM's own budget, claimed when the engine is built
        budget = int(opt.gpu_memory_utilization * gpu)
        phases["engine_start"] = training_state + overhead + budget
        kv_cache = min(kv_cache, budget - parts["gen_weights"] - int(VLLM_OVERHEAD_GIB * GIB))
    phases["generation"] = generation  # without its KV cache
    return {"stage": stage, "params": numel, "bytes": parts, "resident": resident, "left": gpu - resident,
            "activations": activations, "reserve": reserve, "kv_cache": kv_cache, "phases": phases}


def kv_bytes_per_token(dims: ModelDims, gen_tp: int, gen_pp: int, kv_bytes: int) -> int:
    """K and V of one token on one generation rank, whose stage caches its L/p_g layers;
    `rollout.kv_cache.bytes_per_token`."""
    from hybridflow_mg.rollout.kv_cache import bytes_per_token

    return bytes_per_token(dims, gen_tp, kv_bytes, gen_pp)


# --- traffic ---------------------------------------------------------------------------------------
def _intersects(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> bool:
    return any(min(a1, b1) > max(a0, b0) for a0, a1 in a for b0, b1 in b)


def sources(layout: ParallelLayout, rank: int) -> list[int]:
    """Ranks of `rank`'s training replica whose training shard overlaps its generation shard (itself included).

    When t_g | t these are its micro-DP group; otherwise the peers the resharder's exchange reads from.
    """
    gen_tp, gen_layers = _in_units(layout, layout.gen_shard(rank))
    replica = next(g for g in layout.model_parallel_groups if rank in g)
    shards = _train_shards(layout)
    return [peer for peer in replica
            if _intersects([shards[peer][0]], [gen_tp]) and _intersects(shards[peer][1], gen_layers)]


@functools.lru_cache(maxsize=8)  # `traffic` asks `sources` of every rank: each rank's shard once, not once per rank
def _train_shards(layout: ParallelLayout) -> list:
    return [_in_units(layout, layout.train_shard(r)) for r in range(layout.world)]


def _in_units(layout: ParallelLayout, shard: tuple) -> tuple:
    """A (TP interval, layer intervals) shard with its ends as integers in units of 1/(world·vpp): every end is
    k/t, k/t_g, k/(p·vpp) or k/p_g, all dividing world·vpp, so the comparisons stay exact and cost an int's
    (plan --search compares millions of them; as Fractions they were most of its time)."""
    unit = layout.world * layout.vpp

    def scaled(end: Fraction) -> int:
        assert unit % end.denominator == 0, (end, unit)
        return end.numerator * (unit // end.denominator)

    (t0, t1), layers = shard
    return (scaled(t0), scaled(t1)), [(scaled(a), scaled(b)) for a, b in layers]


def _node_local(group: list[int], gpus_per_node: int) -> bool:
    return len({r // gpus_per_node for r in group}) == 1


def _link(local: bool, opt: PlanOptions) -> tuple[str, float]:
    return ("nvlink", opt.nvlink_gbps) if local else ("ib", opt.ib_gbps)


def traffic(layout: ParallelLayout, model_bytes: int, opt: PlanOptions) -> dict:
    """Bytes each rank receives in one reshard, the ideal time, and the §2 baselines."""
    if layout.formula_applies:
        group_of = {r: g for g in layout.micro_dp_groups for r in g}
    else:
        group_of = {r: sources(layout, r) for r in range(layout.world)}
    fractions = [layout.recv_fraction(r) for r in range(layout.world)]
    links = [_link(_node_local(group_of[r], opt.gpus_per_node), opt) for r in range(layout.world)]
    times = [float(f * model_bytes) / (bw * GB) for f, (_, bw) in zip(fractions, links)]
    worst = max(range(layout.world), key=lambda r: (times[r], fractions[r]))
    gpus_tp = layout.tp * layout.pp

    def baseline(design, formula, fraction, groups, peak):
        name, bw = _link(all(_node_local(g, opt.gpus_per_node) for g in groups), opt)
        return {"design": design, "formula": formula, "recv_fraction": str(fraction),
                "recv_bytes": float(fraction * model_bytes), "link": name,
                "time_s": float(fraction * model_bytes) / (bw * GB), "peak_weight_bytes": peak}

    return {
        "model_bytes": model_bytes,
        "recv_bytes_per_rank": [float(f * model_bytes) for f in fractions],
        "recv_fraction_max": str(fractions[worst]),
        "recv_bytes_max": float(fractions[worst] * model_bytes),
        "formula_recv_fraction": str(layout.formula_recv_fraction()) if layout.formula_applies else None,
        "formula_recv_bytes": float(layout.formula_recv_fraction() * model_bytes) if layout.formula_applies else None,
        "link": links[worst][0], "time_s": times[worst],
        "ranks_on_ib": sum(name == "ib" for name, _ in links),
        "sources_of_rank0": group_of[0],
        "baselines": [
            baseline("gather everything", "(t·p·d−1)/(t·p·d)·M", Fraction(layout.world - 1, layout.world),
                     [list(range(layout.world))], model_bytes),
            baseline("HybridFlow-V", "(t·p−1)/(t·p)·M", Fraction(gpus_tp - 1, gpus_tp),
                     layout.model_parallel_groups, model_bytes),
            baseline("HybridFlow (this plan)", "(d_g−1)/(t·p)·M", fractions[worst], [group_of[worst]],
                     model_bytes // (layout.gen_tp * layout.gen_pp)),
        ],
    }


# --- the plan --------------------------------------------------------------------------------------
def make_plan(spec: ModelSpec, layout: ParallelLayout, opt: PlanOptions) -> dict:
    """Everything the `plan` command reports, as one JSON-ready dict (bytes as integers)."""
    dims = spec.dims
    if dims.head != "lm":
        raise ValueError("the actor needs a language-model head; pass a *ForCausalLM config")
    check_layout(spec, layout.tp, layout.pp, layout.vpp)
    check_gen_split(dims, layout.gen_tp, layout.gen_pp)
    stages = [stage_memory(spec, layout, opt, s) for s in range(layout.pp)]
    worst = min(stages, key=lambda s: s["kv_cache"])  # the rank with the least KV room sets the replica's
    per_token = kv_bytes_per_token(dims, layout.gen_tp, layout.gen_pp, opt.bytes_of("kv"))
    overhead = int(OVERHEAD_GIB * GIB) if opt.reserve_gib is None else worst["reserve"]
    sleeping = min(s["left"] for s in stages) - overhead
    numel = model_numel(dims)
    gpu = int(opt.gpu_memory_gib * GIB)
    peaks = {phase: max(s["phases"][phase] for s in stages) for phase in stages[0]["phases"] if phase != "generation"}
    kv_fits = worst["kv_cache"] >= opt.min_kv_tokens * per_token
    return {
        "model": {"family": spec.family, "params": numel, "layers": dims.num_layers, "hidden": dims.hidden_size,
                  "heads": dims.num_heads, "kv_heads": dims.num_kv_heads, "head_dim": dims.head_dim,
                  "ffn": dims.ffn_hidden_size, "vocab": dims.vocab_size, "tied": dims.tie_embeddings,
                  "qkv_bias": dims.qkv_bias},
        "layout": {"world": layout.world,
                   "train": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "vpp": layout.vpp},
                   "gen": {"tp": layout.gen_tp, "pp": layout.gen_pp, "micro_dp": layout.micro_dp,
                           "replicas": layout.num_gen_replicas}},
        "options": dataclasses.asdict(opt) | {"gen_dtype": opt.gen_dtype or opt.params_dtype,
                                               "kv_dtype": opt.kv_dtype or opt.gen_dtype or opt.params_dtype},
        "memory": {"gpu": int(opt.gpu_memory_gib * GIB), **worst},
        "stages": stages,
        "kv": {"bytes_per_token_per_rank": per_token, "budget": max(0, worst["kv_cache"]),
               "tokens_per_replica": max(0, worst["kv_cache"]) // per_token,
               "tokens_per_replica_if_sleeping": max(0, sleeping) // per_token,
               "min_tokens": opt.min_kv_tokens, "fits": kv_fits},
        "peaks": peaks,
        "fits": kv_fits and all(v <= gpu for v in peaks.values()),
        "reshard": traffic(layout, numel * opt.bytes_of("gen"), opt),
    }


# --- the readable report ---------------------------------------------------------------------------
_LABELS = {"actor_weights": "actor weights", "actor_grads": "actor gradients", "actor_optimizer": "actor optimizer",
           "gen_weights": "generation weights", "ref_weights": "reference weights", "critic_weights": "critic weights",
           "critic_grads": "critic gradients", "critic_optimizer": "critic optimizer"}


_PHASES = {"training": "training", "switch": "train→generation switch",
           "engine_start": "vLLM engine start (lower rollout.gpu_memory_utilization)"}


def _gib(n: float) -> str:
    return f"{n / GIB:8.2f}"


def render(plan: dict) -> str:
    """`make_plan`'s dict as the report `hybridflow-mg plan` prints."""
    m, lay, opt, mem, kv, rs = (plan[k] for k in ("model", "layout", "options", "memory", "kv", "reshard"))
    t, g = lay["train"], lay["gen"]
    vpp = f",vpp={t['vpp']}" if t["vpp"] > 1 else ""
    gen_pp = f",pp={g['pp']}" if g["pp"] > 1 else ""
    dp, pdt, gdt = t["dp"], opt["params_dtype"], opt["gen_dtype"]
    ties = ("tied" if m["tied"] else "untied") + (", qkv biases" if m["qkv_bias"] else "")
    by_stage = ", ".join(f"{s['params']['actor']:,}" for s in plan["stages"])
    lines = [
        f"model   {m['family']}: {m['params'] / 1e9:.2f} B parameters ({m['params']:,}); {m['layers']} layers, hidden "
        f"{m['hidden']}, {m['heads']} heads / {m['kv_heads']} KV heads × {m['head_dim']}, ffn {m['ffn']}, "
        f"vocab {m['vocab']}, {ties}",
        f"layout  world={lay['world']} train tp={t['tp']},pp={t['pp']},dp={dp}{vpp} → gen tp={g['tp']}{gen_pp} "
        f"(d_g={g['micro_dp']}, {g['replicas']} generation replicas)",
        "",
        f"memory per GPU, GiB — worst rank: pipeline stage {mem['stage']} of {t['pp']} "
        f"(actor params per rank by stage: {by_stage})",
    ]
    states = ("12" if pdt != "fp32" else "8") + " B/param" + (f" ÷ d={dp} (distributed optimizer)"
                                                              if opt["distributed_optimizer"] else " (not sharded)")
    notes = {"actor_weights": f"{mem['params']['actor']:,} params × {pdt}",
             "actor_grads": f"{opt['grad_dtype']}" + (" (grad_reduce_in_fp32)" if opt["grad_dtype"] == "fp32" else ""),
             "actor_optimizer": f"Adam: fp32 master + 2 moments, {states}",
             "gen_weights": f"vLLM shard tp={g['tp']}{gen_pp}: {mem['params']['gen']:,} params × {gdt}"
                            + (" (the largest stage)" if g["pp"] > 1 else ""),
             "ref_weights": f"weights only, {pdt}",
             "critic_weights": f"{mem['params'].get('critic', 0):,} params (trunk + value head) × {pdt}",
             "critic_grads": opt["grad_dtype"], "critic_optimizer": states}
    for key, value in mem["bytes"].items():
        lines.append(f"  {_LABELS[key]:<20}{_gib(value)}   {notes[key]}")
    lines += [f"  {'-' * 28}",
              f"  {'resident':<20}{_gib(mem['resident'])}   of {mem['gpu'] / GIB:.2f}",
              f"  {'left':<20}{_gib(mem['left'])}   for activations + KV cache"]
    if mem["activations"] is None:
        lines.append(f"  {'reserve':<20}{_gib(mem['reserve'])}   --reserve-gib")
    else:
        lines.append(f"  {'reserve':<20}{_gib(mem['reserve'])}   training activations {mem['activations'] / GIB:.2f} "
                     f"(seq {opt['seq_len']} × micro-batch {opt['micro_batch']}, "
                     f"{'sequence parallel' if opt['sequence_parallel'] else 'no sequence parallelism'}, flash attention, "
                     f"1F1B) + {OVERHEAD_GIB:.2f} overhead")
    kv_heads = max(1, m["kv_heads"] // g["tp"])
    lines.append(f"  {'KV cache':<20}{_gib(mem['kv_cache'])}   → {kv['tokens_per_replica']:,} tokens per generation "
                 f"replica ({kv['bytes_per_token_per_rank']:,} B per token per rank = 2·{m['layers'] // g['pp']} layers·"
                 f"{kv_heads} KV head{'s' if kv_heads > 1 else ''}·{m['head_dim']}·{DTYPE_BYTES[opt['kv_dtype']]} B)")
    lines.append(f"  {'':<20}{'':8}   with vLLM sleep mode freeing the KV cache during training: "
                 f"{kv['tokens_per_replica_if_sleeping']:,} tokens")
    mode = ("vLLM sleeps while training; the training state is offloaded while generating"
            if opt["sleep_mode"] and opt["offload_during_rollout"] else
            "vLLM sleeps while training (KV cache freed)" if opt["sleep_mode"] else "no sleep mode, nothing offloaded")
    peaks, gpu = plan["peaks"], mem["gpu"]
    engine = (f", vLLM engine start {peaks['engine_start'] / GIB:.2f} (its budget "
              f"{opt['gpu_memory_utilization']:g} × GPU, claimed after the training models)" if "engine_start" in peaks else "")
    lines.append(f"  phases ({mode}): training peak {peaks['training'] / GIB:.2f}, train→generation switch "
                 f"{peaks['switch'] / GIB:.2f}{engine}, generation {mem['phases']['generation'] / GIB:.2f} + KV cache")
    if not plan["fits"]:
        hint = "" if opt["distributed_optimizer"] else ", use the distributed optimizer"
        why = (f"the KV cache holds fewer than the {kv['min_tokens']:,} tokens of one sequence" if not kv["fits"]
               else f"the {_PHASES[max(peaks, key=peaks.get)]} peak exceeds {gpu / GIB:.2f} GiB")
        if not (opt["sleep_mode"] and opt["offload_during_rollout"]):
            hint += ", turn on sleep mode and offload"
        lines.append(f"  DOES NOT FIT: {why}; raise tp, pp or dp{hint}, shorten the micro-batches, or drop a model")
    lines += ["  HybridFlow builds the generation shard around the training shard (redundant copy 0); our vLLM "
              "parameters are separate tensors,",
              f"  so the training shard ({mem['bytes']['actor_weights'] / GIB:.2f} GiB) and the generation shard "
              f"({mem['bytes']['gen_weights'] / GIB:.2f} GiB) both live.",
              "",
              f"reshard per rank, one transition (M = {rs['model_bytes'] / GB:.2f} GB in {gdt}; GB = 1e9 B, "
              f"time = bytes / bus bandwidth)",
              f"  {'design':<24}{'receives':<16}{'GB':>8}  {'link':<16}{'ideal time':>10}  peak weights"]
    for b in rs["baselines"]:
        bw = opt["nvlink_gbps"] if b["link"] == "nvlink" else opt["ib_gbps"]
        link = f"{'NVLink' if b['link'] == 'nvlink' else 'IB'} {bw:g} GB/s"
        lines.append(f"  {b['design']:<24}{b['recv_fraction'] + '·M':<16}{b['recv_bytes'] / GB:8.2f}  {link:<16}"
                     f"{b['time_s']:8.3f} s  {b['peak_weight_bytes'] / GB:.2f} GB")
    if rs["formula_recv_fraction"] is not None:
        lines.append(f"  every rank receives (d_g−1)/(t·p)·M = {rs['formula_recv_fraction']}·M = "
                     f"{rs['formula_recv_bytes'] / GB:.2f} GB (grid's recv_fraction × M)")
    else:
        lines.append(f"  t_g does not divide t: ranks receive what their generation shard lacks, at most "
                     f"{rs['recv_fraction_max']}·M")
    group = rs["sources_of_rank0"]
    what = "micro-DP group of rank 0" if rs["formula_recv_fraction"] is not None else "rank 0 reads from ranks"
    lines.append(f"  {what}: {group} ({opt['gpus_per_node']} GPUs per node); "
                 f"{rs['ranks_on_ib']} of {lay['world']} ranks receive over InfiniBand")
    return "\n".join(lines)

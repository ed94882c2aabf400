"""`plan --search`: the layouts of one model on N GPUs that fit, ranked by a modelled RL step time.

Pure arithmetic, no torch. Fitting is `planning.make_plan`'s memory model, so a row and
`plan --hf-config … --train … --gen …` with the same options print the same memory and reshard numbers
(each row names that command). Placement: beside `planning.py`, below `commands/`.

Enumeration. Training layouts (t, p, vpp, d = N/(t·p)) and generation layouts (t_g, p_g) with t_g·p_g
dividing t·p or a multiple of it, and each nested with its training axis (`ParallelLayout`'s rule). A
layout is excluded, with its reason, when

- the model does not split so (heads, KV heads, ffn, vocab over t or t_g; layers over p·vpp or p_g);
- t or t_g is wider than a node (``gpus_per_node``): tensor parallelism all-reduces twice per layer and
  is run over NVLink only;
- the prompts do not split over d with one per mini-batch (`trainer.config.check_batch_split`'s rule);
- it does not fit: a training / switch peak above the GPU, or a KV cache below one sequence (`make_plan`).

vpp stops at ``max_vpp``: the model charges nothing for the extra stage-to-stage transfers that
interleaving brings (vpp times as many, Narayanan et al. 2021 §2.2.2), so deeper interleaving would
always rank higher.

Time of one RL step = reshard + training + decode. Each term is an ideal (a lower bound) and each
constant a `SearchOptions` field (a flag of `plan`), with its source there:

- reshard: the largest over ranks of `ParallelLayout.recv_fraction(rank)`·M / the rank's link, NVLink
  when the ranks it reads from share its node, else InfiniBand (`planning.traffic`). One per step.
- training: model FLOPs / (N · peak · MFU) · (1 + bubble). Per token of a sequence of s tokens, a
  forward-backward costs 6·W + 12·L·q·s and a forward 2·W + 4·L·q·s (Narayanan et al. 2021, "Efficient
  Large-Scale Language Model Training on GPU Clusters", §5.1 model FLOPs without recomputation,
  written per parameter: W the parameters that multiply — all but the input embedding —, q = heads ·
  head_dim). Passes: the actor's forward-backward and old-log-prob forward, the reference's forward
  (``with_ref``), the critic's forward and forward-backward (``with_critic``). Every sequence counts at
  its full s (the longest one sets the step). Pipeline bubble (p − 1)/(m · vpp) with m micro-batches
  per DP rank per optimizer step (Narayanan et al. 2021 §2.2.1, §2.2.2). TP, DP and pipeline
  communication are not charged: they are what keeps the MFU below 1.
- decode: memory-bound. Each of a replica's t_g GPUs reads its generation weight shard and the KV
  cache of the sequences running, once per generated token: (W_g + c · (prompt + response/2) · kv)
  / HBM bandwidth per step, response steps per wave, ⌈sequences per replica / c⌉ waves, c = the
  sequences running at once: the fewest of those a replica is given, its KV cache holds at full length
  and vLLM's max_num_seqs. Prefill, sampling, TP all-reduces and scheduling are not charged.
  With p_g > 1 stages, a step runs the stages one after another: vLLM's external_launcher keeps one
  batch in flight (no second batch decoding on stage 0 while the first is on stage 1 is assumed), so a
  step is the sum over stages s of (W_s + c · (prompt + response/2) · kv_s) / HBM, W_s the stage's
  per-rank shard and kv_s its per-rank bytes per token (L/p_g layers): about (replica weights + KV) /
  t_g / HBM, so a t_g·p_g replica decodes a step no faster than a t_g one. p_g buys memory (each rank
  holds 1/p_g of the layers and their KV: more sequences at once per replica, or a layout that fits at
  all), not latency; the stage-to-stage activation sends are not charged either.
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass

from hybridflow_mg.models.hf_spec import ModelSpec, check_layout
from hybridflow_mg.parallel.layout import ParallelLayout
from hybridflow_mg.planning import (GB, GIB, PlanOptions, check_gen_split, critic_dims, gen_stage_numels, make_plan,
                                    model_numel)

REASONS = {
    "split": "the model does not split so",
    "node": "tensor parallelism wider than a node",
    "batch": "the prompts do not split over dp and the mini-batches",
    "memory": "do not fit the GPU",
}


@dataclass(frozen=True, kw_only=True)
class SearchOptions:
    """What the search assumes beyond `PlanOptions` (the memory model): the step and the hardware."""

    gpus: int
    """GPUs of the run: the world of every layout."""
    batch: int = 1024
    """Sequences per RL step, prompts × samples (default 128 × 8, as the 70B presets)."""
    samples: int = 8
    """Samples per prompt (rollout.n); data parallelism splits the batch / samples prompts."""
    response_len: int | None = None
    """Generated tokens per sequence, out of PlanOptions.seq_len; default half of it."""
    mini_batches: int = 4
    """Optimizer steps per RL step (actor.mini_batches, 4 in the 70B presets): sets the micro-batches per pass."""
    max_vpp: int = 2
    """Largest virtual pipeline size tried (the model does not charge interleaving's extra transfers)."""
    max_num_seqs: int = 256
    """Sequences vLLM runs at once per replica (rollout.max_num_seqs, our default)."""
    peak_tflops: float = 989.0
    """Dense bf16 peak per GPU, TFLOP/s: H100 SXM, NVIDIA H100 datasheet (1979 is with sparsity)."""
    mfu: float = 0.4
    """Model FLOPs utilization of training. An assumption: Narayanan et al. 2021 reach 0.52 of A100 peak
    at 1T parameters; RL updates with short micro-batches and no recomputation run lower."""
    hbm_gbps: float = 3350.0
    """HBM bandwidth per GPU, GB/s: H100 SXM, NVIDIA H100 datasheet (H200: 4800)."""
    top: int = 5
    """Rows printed."""

    def __post_init__(self):
        for key in ("gpus", "batch", "samples", "mini_batches", "max_vpp", "max_num_seqs", "top"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key}={value!r} must be a positive integer")
        for key in ("peak_tflops", "hbm_gbps"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}={getattr(self, key)!r} must be positive")
        if not 0 < self.mfu <= 1:
            raise ValueError(f"mfu={self.mfu!r} must be in (0, 1]")
        if self.batch % self.samples:
            raise ValueError(f"batch={self.batch} sequences is not a whole number of prompts of "
                             f"{self.samples} samples; make it a multiple of {self.samples}")

    def response(self, seq_len: int) -> int:
        response = seq_len // 2 if self.response_len is None else self.response_len
        if not 0 < response < seq_len:
            raise ValueError(f"response_len={response} must be between 0 and seq_len={seq_len} "
                             "(the prompt is the rest)")
        return response


@dataclass(frozen=True)
class Candidate:
    tp: int
    pp: int
    vpp: int
    gen_tp: int
    gen_pp: int

    def name(self, gpus: int) -> str:
        vpp = f",vpp={self.vpp}" if self.vpp > 1 else ""
        gen_pp = f",pp={self.gen_pp}" if self.gen_pp > 1 else ""
        return f"tp={self.tp},pp={self.pp},dp={gpus // (self.tp * self.pp)}{vpp} → gen tp={self.gen_tp}{gen_pp}"


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _nested(a: int, b: int) -> bool:
    return a % b == 0 or b % a == 0


def candidates(gpus: int, max_vpp: int) -> list[Candidate]:
    """Every layout pair `ParallelLayout` accepts on `gpus` GPUs, vpp up to `max_vpp` (vpp > 1 needs p > 1):
    t_g·p_g divides t·p, or is a multiple of it (a generation replica over several training replicas)."""
    out = []
    for tp in _divisors(gpus):
        for pp in _divisors(gpus // tp):
            for vpp in range(1, (max_vpp if pp > 1 else 1) + 1):
                for gen_tp in (g for g in _divisors(gpus) if _nested(tp, g)):
                    for gen_pp in (g for g in _divisors(gpus // gen_tp) if _nested(pp, g)):
                        if _nested(tp * pp, gen_tp * gen_pp):
                            out.append(Candidate(tp, pp, vpp, gen_tp, gen_pp))
    return out


def _structural(spec: ModelSpec, c: Candidate, opt: PlanOptions, search: SearchOptions) -> tuple[str, str] | None:
    """(reason key, detail) for what excludes `c` before its memory is counted; None when nothing does."""
    try:
        check_layout(spec, c.tp, c.pp, c.vpp)
        check_gen_split(spec.dims, c.gen_tp, c.gen_pp)
    except ValueError as e:
        return "split", str(e)
    node = opt.gpus_per_node
    if max(c.tp, c.gen_tp) > node:
        return "node", f"tp={c.tp}, gen tp={c.gen_tp}: a TP group wider than a node of {node} GPUs"
    dp, prompts = search.gpus // (c.tp * c.pp), search.batch // search.samples
    if prompts % dp:
        return "batch", f"{prompts} prompts are not a multiple of dp={dp}"
    if prompts // dp < search.mini_batches:
        return "batch", (f"{prompts} prompts give each of dp={dp} ranks {prompts // dp}, fewer than "
                         f"{search.mini_batches} mini-batches")
    return None


def _does_not_fit(plan: dict, opt: PlanOptions) -> tuple[str, int] | None:
    """(why, bytes it lacks) when `plan` does not fit; None when it does."""
    gpu = plan["memory"]["gpu"]
    kv = plan["kv"]
    over = {phase: peak - gpu for phase, peak in plan["peaks"].items() if peak > gpu}
    if over:
        phase = max(over, key=over.get)
        return f"{phase} peak {plan['peaks'][phase] / GIB:.1f} GiB above {gpu / GIB:g} GiB", over[phase]
    if not kv["fits"]:
        lack = kv["min_tokens"] * kv["bytes_per_token_per_rank"] - plan["memory"]["kv_cache"]
        return (f"KV cache holds {kv['tokens_per_replica']:,} tokens, fewer than one {kv['min_tokens']:,}-token "
                f"sequence", lack)
    return None


# --- the time model --------------------------------------------------------------------------------
def step_time(spec: ModelSpec, layout: ParallelLayout, plan: dict, opt: PlanOptions, search: SearchOptions) -> dict:
    """The three terms of one RL step for a layout that fits (see the module docstring)."""
    dims = spec.dims
    seq = opt.seq_len
    response = search.response(seq)
    prompt = seq - response

    rs = plan["reshard"]
    reshard = {"recv_fraction": rs["recv_fraction_max"], "recv_bytes": rs["recv_bytes_max"], "link": rs["link"],
               "time_s": rs["time_s"]}

    def matmul_params(d) -> int:  # the input embedding is a lookup; a tied one still multiplies as the output layer
        return model_numel(d) - (0 if d.tie_embeddings and d.head == "lm" else d.vocab_size * d.hidden_size)

    attention = dims.num_layers * dims.num_heads * dims.head_dim * seq  # L·q·s; QKᵀ and AV: 4·L·q·s FLOPs forward

    def train(w):
        return 6 * w + 12 * attention

    def forward(w):
        return 2 * w + 4 * attention

    actor = matmul_params(dims)
    per_token = train(actor) + forward(actor) + (forward(actor) if opt.with_ref else 0)
    if opt.with_critic:
        critic = matmul_params(critic_dims(dims))
        per_token += forward(critic) + train(critic)
    tokens = search.batch * seq
    flops = tokens * per_token
    compute_s = flops / (search.gpus * search.peak_tflops * 1e12 * search.mfu)
    per_rank = search.batch // (layout.dp * search.mini_batches)  # sequences per DP rank per optimizer step
    micro_batches = max(1, math.ceil(per_rank / opt.micro_batch))
    bubble = (layout.pp - 1) / (micro_batches * layout.vpp)
    training = {"flops": flops, "per_token_flops": per_token, "compute_s": compute_s, "micro_batches": micro_batches,
                "bubble": bubble, "time_s": compute_s * (1 + bubble)}

    kv = plan["kv"]
    replicas = layout.num_gen_replicas
    per_replica = math.ceil(search.batch / replicas)
    concurrent = min(per_replica, kv["tokens_per_replica"] // seq, search.max_num_seqs)
    waves = math.ceil(per_replica / concurrent)
    # the stages of a replica decode one after another (one batch in flight): a step reads every stage's shard
    weights = sum(gen_stage_numels(dims, layout.gen_tp, layout.gen_pp)) * opt.bytes_of("gen")
    kv_read = layout.gen_pp * concurrent * (prompt + response / 2) * kv["bytes_per_token_per_rank"]  # mean context
    step_s = (weights + kv_read) / (search.hbm_gbps * GB)
    decode = {"replicas": replicas, "per_replica": per_replica, "concurrent": concurrent, "waves": waves,
              "stages": layout.gen_pp, "weight_bytes": weights, "kv_bytes": kv_read, "step_s": step_s,
              "time_s": waves * response * step_s}
    total = reshard["time_s"] + training["time_s"] + decode["time_s"]
    return {"reshard": reshard, "training": training, "decode": decode, "total_s": total}


# --- the search ------------------------------------------------------------------------------------
def search_layouts(spec: ModelSpec, opt: PlanOptions, search: SearchOptions) -> dict:
    """Every candidate layout either ranked (fits, with its step time) or excluded (with its reason)."""
    response = search.response(opt.seq_len)
    weights = model_numel(spec.dims) * opt.bytes_of("params")
    if weights / search.gpus > opt.gpu_memory_gib * GIB:
        raise ValueError(f"--gpu-memory {opt.gpu_memory_gib:g} GiB is below the weights alone: {spec.family}'s "
                         f"{weights / GIB:.1f} GiB in {opt.params_dtype} are {weights / search.gpus / GIB:.2f} GiB "
                         f"per GPU even split over all {search.gpus} GPUs; give more --gpus or a larger --gpu-memory")
    ranked, excluded = [], []
    for c in candidates(search.gpus, search.max_vpp):
        name = c.name(search.gpus)
        why = _structural(spec, c, opt, search)
        if why is None:
            layout = ParallelLayout.create(world=search.gpus, tp=c.tp, pp=c.pp, vpp=c.vpp, gen_tp=c.gen_tp,
                                           gen_pp=c.gen_pp)
            plan = make_plan(spec, layout, opt)
            short = _does_not_fit(plan, opt)
            if short is None:
                ranked.append(_row(c, name, layout, plan, step_time(spec, layout, plan, opt, search), opt))
            else:
                excluded.append({"layout": name, "reason": "memory", "detail": short[0], "lacks_bytes": short[1],
                                 "gen_pp": c.gen_pp})
        else:
            excluded.append({"layout": name, "reason": why[0], "detail": why[1]})
    ranked.sort(key=lambda r: (r["total_s"], r["key"]))
    counts = Counter(e["reason"] for e in excluded)
    return {"model": {"family": spec.family, "params": model_numel(spec.dims)},
            "gpus": search.gpus, "seq_len": opt.seq_len, "response_len": response,
            "options": dataclasses.asdict(search),
            "memory_options": {k: getattr(opt, k) for k in ("gpu_memory_gib", "sleep_mode", "offload_during_rollout",
                                                             "with_ref", "with_critic", "micro_batch", "gpus_per_node",
                                                             "nvlink_gbps", "ib_gbps", "params_dtype")},
            "candidates": len(ranked) + len(excluded), "ranked": ranked,
            "excluded_counts": {k: counts[k] for k in REASONS if counts[k]}, "excluded": excluded}


def _row(c: Candidate, name: str, layout: ParallelLayout, plan: dict, times: dict, opt: PlanOptions) -> dict:
    vpp = f",vpp={c.vpp}" if c.vpp > 1 else ""
    gen_pp = f",pp={c.gen_pp}" if c.gen_pp > 1 else ""
    flags = [f"--train tp={c.tp},pp={c.pp},dp={layout.dp}{vpp}", f"--gen tp={c.gen_tp}{gen_pp}",
             f"--seq-len {opt.seq_len}", f"--micro-batch {opt.micro_batch}", f"--gpu-memory {opt.gpu_memory_gib:g}",
             "--sleep-mode" if opt.sleep_mode else "--no-sleep-mode",
             "--offload" if opt.offload_during_rollout else "--no-offload"]
    flags += [flag for flag, on in (("--with-ref", opt.with_ref), ("--with-critic", opt.with_critic)) if on]
    return {"layout": name, "key": (c.tp, c.pp, c.vpp, c.gen_tp, c.gen_pp),
            "train": {"tp": c.tp, "pp": c.pp, "vpp": c.vpp, "dp": layout.dp},
            "gen": {"tp": c.gen_tp, "pp": c.gen_pp, "micro_dp": layout.micro_dp, "replicas": layout.num_gen_replicas},
            "peaks": plan["peaks"], "kv_tokens_per_replica": plan["kv"]["tokens_per_replica"],
            **times, "check": "plan " + " ".join(flags)}


# --- the readable report ---------------------------------------------------------------------------
def render_search(result: dict, hf_config: str) -> str:
    """`search`'s dict as the table `plan --search` prints."""
    o, m, mem = result["options"], result["model"], result["memory_options"]
    seq, response = result["seq_len"], result["response_len"]
    mode = ("sleep mode + offload" if mem["sleep_mode"] and mem["offload_during_rollout"] else
            "sleep mode" if mem["sleep_mode"] else "no sleep mode")
    roles = "actor" + (" + reference" if mem["with_ref"] else "") + (" + critic" if mem["with_critic"] else "")
    lines = [f"plan --search  {m['family']} {m['params'] / 1e9:.2f} B on {result['gpus']} GPUs of "
             f"{mem['gpu_memory_gib']:g} GiB ({mem['gpus_per_node']} per node); {roles}; {mode}",
             f"step: {o['batch']} sequences ({o['batch'] // o['samples']} prompts × {o['samples']}) of {seq} tokens "
             f"({seq - response} prompt + {response} response), {o['mini_batches']} mini-batches, micro-batch "
             f"{mem['micro_batch']}",
             "",
             f" #  {'training':<24}{'generation':<16}{'peak GiB':>8}  {'reshard':<24}{'training':<22}"
             f"{'decode':<26}{'total':>9}"]
    for i, r in enumerate(result["ranked"][:o["top"]], 1):
        t, g, rs, tr, dc = r["train"], r["gen"], r["reshard"], r["training"], r["decode"]
        vpp = f" vpp{t['vpp']}" if t["vpp"] > 1 else ""
        link = "NVLink" if rs["link"] == "nvlink" else "IB"
        plural = "s" if dc["waves"] > 1 else ""
        lines.append(
            f"{i:>2}  {'tp%d pp%d%s dp%d' % (t['tp'], t['pp'], vpp, t['dp']):<24}"
            f"{'tp%d%s × %d' % (g['tp'], ' pp%d' % g['pp'] if g['pp'] > 1 else '', g['replicas']):<16}{max(r['peaks'].values()) / GIB:8.1f}  "
            f"{'%.2f s %s·M %s' % (rs['time_s'], rs['recv_fraction'], link):<24}"
            f"{'%.1f s bubble %.1f%%' % (tr['time_s'], 100 * tr['bubble']):<22}"
            f"{'%.1f s %d seq × %d wave%s' % (dc['time_s'], dc['concurrent'], dc['waves'], plural):<26}"
            f"{r['total_s']:7.1f} s")
    if result["ranked"]:
        best = result["ranked"][0]
        lines += ["", f"check #1: hybridflow-mg {best['check'].replace('plan ', f'plan --hf-config {hf_config} ', 1)}"]
    lines += [
        "",
        f"reshard  = max over ranks of recv_fraction·M / link (NVLink {mem['nvlink_gbps']:g} GB/s inside a node, "
        f"IB {mem['ib_gbps']:g} GB/s across)",
        "training = FLOPs (6·W + 12·L·q·s per token trained, 2·W + 4·L·q·s per forward; Narayanan et al. 2021) "
        f"/ ({result['gpus']} GPUs · {o['peak_tflops']:g} TFLOP/s · MFU {o['mfu']:g}) · (1 + (p−1)/(m·vpp))",
        f"decode   = waves · {response} tokens · (generation weight shard + running sequences' KV) / HBM "
        f"{o['hbm_gbps']:g} GB/s, summed over a replica's gen pp stages (one batch in flight); at most "
        f"{o['max_num_seqs']} sequences per replica",
        "defaults: --peak-tflops 989 (H100 SXM dense bf16, NVIDIA datasheet), --mfu 0.4 (an assumption), --hbm-gbps "
        "3350 (H100 SXM datasheet), --nvlink-gbps 370 (NVLink4 NCCL bus bandwidth), --ib-gbps 50 (one 400 Gb/s NIC)",
        "",
        f"{len(result['ranked'])} of {result['candidates']} layouts fit; excluded:"]
    for key, count in result["excluded_counts"].items():
        of_key = [e for e in result["excluded"] if e["reason"] == key]
        example = _nearest(of_key) if key == "memory" else of_key[0]
        nearest = "the nearest, " if key == "memory" else "e.g. "
        lines.append(f"  {count:>4}  {REASONS[key]}; {nearest}{example['layout']}: {example['detail']}")
    return "\n".join(lines)


def _nearest(tight: list[dict]) -> dict:
    """The memory exclusion that lacks the least; among equals (a training peak is the same for every generation
    layout) the one with the fewest generation stages."""
    return min(tight, key=lambda e: (e["lacks_bytes"], e["gen_pp"]))


def nothing_fits(result: dict) -> str:
    """The one line for a search where no layout fits: the nearest layout and what to change."""
    mem = result["memory_options"]
    counts = ", ".join(f"{n} {REASONS[k]}" for k, n in result["excluded_counts"].items())
    where = f"no layout of {result['model']['family']} fits {result['gpus']} GPUs of {mem['gpu_memory_gib']:g} GiB " \
            f"({result['candidates']} tried: {counts})"
    tight = [e for e in result["excluded"] if e["reason"] == "memory"]
    if not tight:
        return f"{where}; change --gpus, --batch, --samples or --mini-batches"
    near = _nearest(tight)
    hint = "" if mem["sleep_mode"] and mem["offload_during_rollout"] else ", --sleep-mode --offload"
    return (f"{where}; the nearest, {near['layout']}, lacks {near['lacks_bytes'] / GIB:.1f} GiB ({near['detail']}); "
            f"use more or larger GPUs, a shorter --seq-len{hint}")

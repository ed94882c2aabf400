"""`hybridflow-mg plan`: per-GPU memory and reshard traffic for a model and a layout, without a GPU.

    hybridflow-mg plan configs/llama3-70b-tp8pp2.yaml --gpus 64 --gpu-memory 80GB      # a training config
    hybridflow-mg plan --hf-config FILE --train tp=8,pp=2,dp=4 --gen tp=8             # a model and layouts
    hybridflow-mg plan --hf-config FILE --train tp=4,pp=4,dp=4 --gen tp=4,pp=2        # generation pipeline stages
    hybridflow-mg plan --search --hf-config FILE --gpus 64 --gpu-memory 80GB          # rank every layout

From a training config, everything is read from it: the model's HF config (`model.hf_config`, else
`model.path`/config.json), the layouts (dp = GPUs / (tp·pp)), dtypes, which roles the algorithm
builds, sequence lengths and micro-batch tokens, sleep mode, offload and vLLM's
`gpu_memory_utilization`; the plan then fits only if a generation replica's KV cache holds one
longest sequence (prompt + response) and the training, switch and vLLM-engine-start peaks fit the GPU
(vLLM claims its budget when the engine is built, after the training models). A plan that does not fit prints its report and exits 2 with one line.

Pure arithmetic from the HF config.json (no torch, megatron-core or vLLM is imported): exact shard
sizes per pipeline stage, actor weights / gradients / Adam states, the vLLM generation shard (with
gen pp > 1 the largest of vLLM's stages, whose KV cache holds its own layers only), optional critic
and reference models, what is left for activations and the KV cache, and the bytes and ideal time of
one reshard next to the DESIGN.md §2 baselines. The assumptions are listed in
`hybridflow_mg/planning.py`.

With --search: every training layout (tp, pp, vpp, dp) and generation layout (tp, pp) on --gpus GPUs,
those that do not fit excluded with their reason, the rest ranked by a modelled RL step time = reshard
+ training + decode, each term printed (the model and the sources of its constants:
`hybridflow_mg/planning_search.py`). No layout fitting is one line and exit 2.
"""
from __future__ import annotations

import argparse
import json

from hybridflow_mg.commands._args import parse_sizes
from hybridflow_mg.parallel.layout import ParallelLayout
from hybridflow_mg.models.hf_spec import read_hf_config, spec_from_hf
from hybridflow_mg.planning import DTYPE_BYTES, PlanOptions, make_plan, render
from hybridflow_mg.planning_search import SearchOptions, nothing_fits, render_search, search_layouts


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="per-GPU memory and reshard traffic for a model and layout (no GPU needed)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="a training config (YAML preset); or give --hf-config and --train")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of the training config")
    p.add_argument("--gpus", type=int, help="with a training config or --search: the number of GPUs (the world size)")
    p.add_argument("--hf-config", metavar="FILE", help="HF config.json (or its directory)")
    p.add_argument("--train", metavar="tp=T,pp=P,dp=D[,vpp=V]", help="training layout")
    p.add_argument("--gen", default="", metavar="tp=TG[,pp=PG]",
                   help="generation layout (default: tp as training, pp=1); pp must divide the layers")
    dtypes = [d for d in DTYPE_BYTES if d != "fp8"]
    p.add_argument("--params-dtype", default="bf16", choices=dtypes, help="training weights (default bf16)")
    p.add_argument("--grad-dtype", default="fp32", choices=dtypes,
                   help="gradient buffers: fp32 (grad_reduce_in_fp32, default) or the params dtype")
    p.add_argument("--gen-dtype", choices=dtypes, help="vLLM weights and M (default: params dtype)")
    p.add_argument("--kv-dtype", choices=list(DTYPE_BYTES), help="KV cache (default: generation dtype)")
    p.add_argument("--distributed-optimizer", default=True, action=argparse.BooleanOptionalAction,
                   help="shard Adam states over dp (default on)")
    p.add_argument("--with-critic", action="store_true", help="a critic (trunk + value head) trained on the same GPUs")
    p.add_argument("--with-ref", action="store_true", help="a reference model (weights only) on the same GPUs")
    p.add_argument("--gpu-memory", type=_gib, default=80.0, metavar="GIB",
                   help="memory per GPU in GiB, e.g. 80 or 80GB (a GPU's GB are GiB: an H100 80GB has 80 GiB)")
    p.add_argument("--reserve-gib", type=float, metavar="GIB",
                   help="keep this out of the KV cache instead of the activation + overhead estimate")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per training sequence (activation estimate)")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch (activation estimate)")
    p.add_argument("--gpus-per-node", "--nodes-of", type=int, default=8, help="consecutive ranks per node (default 8)")
    p.add_argument("--sleep-mode", default=None, action=argparse.BooleanOptionalAction,
                   help="vLLM sleep mode: KV cache freed while training (default: on with --search, as every GPU "
                        "preset and rollout.enable_sleep_mode; off for one --train layout)")
    p.add_argument("--offload", default=None, action=argparse.BooleanOptionalAction,
                   help="with sleep mode, the training state waits in host memory while vLLM generates "
                        "(default: on with --search, as every GPU preset; off for one --train layout)")
    p.add_argument("--nvlink-gbps", type=float, default=370.0,
                   help="NVLink NCCL bus bandwidth, GB/s (default 370: NVLink4 on H100, DESIGN.md §2)")
    p.add_argument("--ib-gbps", type=float, default=50.0,
                   help="InfiniBand per GPU, GB/s (default 50: one 400 Gb/s NDR NIC per GPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_search_flags(p)
    p.set_defaults(run=run)


def _add_search_flags(p) -> None:
    d = SearchOptions.__dataclass_fields__
    s = p.add_argument_group("--search", "rank every layout by a modelled step time (planning_search.py)")
    s.add_argument("--search", action="store_true", help="enumerate, fit and rank layouts (needs --hf-config, --gpus)")
    s.add_argument("--top", type=int, default=d["top"].default, help="rows printed (default 5)")
    s.add_argument("--batch", type=int, default=d["batch"].default,
                   help="sequences per RL step, prompts × samples (default 1024 = 128 × 8, the 70B presets)")
    s.add_argument("--samples", type=int, default=d["samples"].default, help="samples per prompt (default 8)")
    s.add_argument("--response-len", type=int, help="generated tokens per sequence, out of --seq-len (default half)")
    s.add_argument("--mini-batches", type=int, default=d["mini_batches"].default,
                   help="optimizer steps per RL step (default 4, the 70B presets)")
    s.add_argument("--max-vpp", type=int, default=d["max_vpp"].default,
                   help="largest virtual pipeline size tried (default 2; interleaving's extra p2p is not charged)")
    s.add_argument("--max-num-seqs", type=int, default=d["max_num_seqs"].default,
                   help="sequences per vLLM replica at once (default 256, rollout.max_num_seqs)")
    s.add_argument("--peak-tflops", type=float, default=d["peak_tflops"].default,
                   help="dense bf16 TFLOP/s per GPU (default 989: H100 SXM, NVIDIA datasheet)")
    s.add_argument("--mfu", type=float, default=d["mfu"].default,
                   help="training model FLOPs utilization (default 0.4, an assumption; Narayanan et al. 2021 "
                        "reach 0.52)")
    s.add_argument("--hbm-gbps", type=float, default=d["hbm_gbps"].default,
                   help="HBM GB/s per GPU (default 3350: H100 SXM, NVIDIA datasheet; H200 4800)")


def _gib(text: str) -> float:
    raw = text.strip().upper().removesuffix("B").removesuffix("I").removesuffix("G")
    try:
        return float(raw)  # its range is PlanOptions' to check, with a one-line error
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a memory size like 80 or 80GB") from None


def layout_from_args(train: str, gen: str) -> ParallelLayout:
    t = parse_sizes(train, ("tp", "pp", "dp", "vpp"), "--train")
    g = parse_sizes(gen, ("tp", "pp"), "--gen")
    if "dp" not in t:
        raise ValueError("--train needs dp= (the data-parallel size decides the world and the optimizer shards)")
    tp, pp, dp = t.get("tp", 1), t.get("pp", 1), t["dp"]
    return ParallelLayout.create(world=tp * pp * dp, tp=tp, pp=pp, dp=dp, vpp=t.get("vpp", 1), gen_tp=g.get("tp"),
                                 gen_pp=g.get("pp", 1))


def run(args) -> int:
    if args.search:
        return run_search(args)
    if args.config is not None:
        spec, layout, options = from_train_config(args)
    else:
        if not args.hf_config or not args.train:
            raise ValueError("give a training config (plan CONFIG --gpus N) or --hf-config FILE and --train tp=,pp=,dp=")
        layout = layout_from_args(args.train, args.gen)
        spec = spec_from_hf(read_hf_config(args.hf_config), head="lm")
        options = options_from_args(args, sleep_default=False)
    plan = make_plan(spec, layout, options)
    print(json.dumps(plan, indent=1) if args.json else render(plan))
    if args.config is not None and not plan["fits"]:
        raise ValueError(f"{args.config} does not fit {args.gpus} GPUs of {args.gpu_memory:g} GiB: "
                         f"see DOES NOT FIT above; change parallel.train / parallel.gen or the lengths")
    return 0


def options_from_args(args, *, sleep_default: bool) -> PlanOptions:
    """The memory model's options from the flags; the KV cache must hold one --seq-len sequence."""
    sleep = sleep_default if args.sleep_mode is None else args.sleep_mode
    offload = sleep_default if args.offload is None else args.offload
    return PlanOptions(
        params_dtype=args.params_dtype, grad_dtype=args.grad_dtype, gen_dtype=args.gen_dtype,
        kv_dtype=args.kv_dtype, distributed_optimizer=args.distributed_optimizer, with_critic=args.with_critic,
        with_ref=args.with_ref, gpu_memory_gib=args.gpu_memory, reserve_gib=args.reserve_gib,
        seq_len=args.seq_len, micro_batch=args.micro_batch, gpus_per_node=args.gpus_per_node,
        nvlink_gbps=args.nvlink_gbps, ib_gbps=args.ib_gbps, sleep_mode=sleep, offload_during_rollout=offload,
        min_kv_tokens=args.seq_len)


def run_search(args) -> int:
    """`plan --search`: rank every layout of --hf-config on --gpus GPUs; one line and exit 2 when none fits."""
    if args.config is not None or args.train:
        raise ValueError("plan --search takes --hf-config FILE and --gpus N, not a training config or --train")
    if not args.hf_config or not args.gpus:
        raise ValueError("plan --search needs --hf-config FILE and --gpus N (e.g. --gpus 64)")
    spec = spec_from_hf(read_hf_config(args.hf_config), head="lm")
    search = SearchOptions(gpus=args.gpus, batch=args.batch, samples=args.samples, response_len=args.response_len,
                           mini_batches=args.mini_batches, max_vpp=args.max_vpp, max_num_seqs=args.max_num_seqs,
                           peak_tflops=args.peak_tflops, mfu=args.mfu, hbm_gbps=args.hbm_gbps, top=args.top)
    result = search_layouts(spec, options_from_args(args, sleep_default=True), search)
    if not result["ranked"]:
        raise ValueError(nothing_fits(result))
    print(json.dumps(result, indent=1) if args.json else render_search(result, args.hf_config))
    return 0


def from_train_config(args) -> tuple:
    """(spec, layout, options) for `plan CONFIG --gpus N`: every assumption read from the training config."""
    import os

    from hybridflow_mg.config.load import load_config
    from hybridflow_mg.trainer.config import TrainConfig

    if not args.gpus or args.gpus < 1:
        raise ValueError("plan CONFIG needs --gpus N, the number of GPUs the run will use")
    cfg = load_config(TrainConfig, args.config, args.overrides)
    source = cfg.model.hf_config or (os.path.join(cfg.model.path, "config.json") if cfg.model.path else None)
    if source is None:
        raise ValueError(f"{args.config}: plan needs the model's HF config: set model.hf_config (or model.path)")
    spec = spec_from_hf(read_hf_config(source), head="lm", vocab_divisor=cfg.model.vocab_divisor)
    t, g = cfg.parallel.train, cfg.parallel.gen
    layout = ParallelLayout.create(world=args.gpus, tp=t.tp, pp=t.pp, vpp=t.vpp, dp=t.dp, gen_tp=g.tp, gen_pp=g.pp)
    dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    longest = cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
    needs = cfg.algo.needs
    options = PlanOptions(
        params_dtype=dtype[cfg.model.dtype], gen_dtype=dtype[cfg.rollout.dtype] if cfg.rollout.dtype in dtype else None,
        distributed_optimizer=True, with_critic="values" in needs, with_ref="ref_logprobs" in needs,
        gpu_memory_gib=args.gpu_memory, seq_len=longest, micro_batch=max(1, cfg.actor.micro_batch_tokens // longest),
        gpus_per_node=args.gpus_per_node, nvlink_gbps=args.nvlink_gbps, ib_gbps=args.ib_gbps,
        sleep_mode=cfg.rollout.enable_sleep_mode, offload_during_rollout=cfg.trainer.offload_during_rollout,
        min_kv_tokens=longest, gpu_memory_utilization=cfg.rollout.gpu_memory_utilization)
    return spec, layout, options

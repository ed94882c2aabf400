"""`hybridflow-mg plan`: per-GPU memory and reshard traffic for a model and a layout, without a GPU.

Pure arithmetic from the HF config.json (no torch, megatron-core or vLLM is imported): exact shard
sizes per pipeline stage, actor weights / gradients / Adam states, the vLLM generation shard,
optional critic and reference models, what is left for activations and the KV cache, and the
bytes and ideal time of one reshard next to the DESIGN.md §2 baselines. The assumptions are listed
in `hybridflow_mg/planning.py`.
"""
from __future__ import annotations

import argparse
import json

from hybridflow_mg.commands._args import parse_sizes
from hybridflow_mg.parallel.layout import ParallelLayout
from hybridflow_mg.models.hf_spec import read_hf_config, spec_from_hf
from hybridflow_mg.planning import DTYPE_BYTES, PlanOptions, make_plan, render


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="per-GPU memory and reshard traffic for a model and layout (no GPU needed)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-config", required=True, metavar="FILE", help="HF config.json (or its directory)")
    p.add_argument("--train", required=True, metavar="tp=T,pp=P,dp=D[,vpp=V]", help="training layout")
    p.add_argument("--gen", default="", metavar="tp=TG", help="generation layout (default: tp as training)")
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
    p.add_argument("--gpu-memory", type=float, default=80.0, metavar="GIB", help="memory per GPU (default 80)")
    p.add_argument("--reserve-gib", type=float, metavar="GIB",
                   help="keep this out of the KV cache instead of the activation + overhead estimate")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per training sequence (activation estimate)")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch (activation estimate)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="consecutive ranks per node (default 8)")
    p.add_argument("--nvlink-gbps", type=float, default=370.0, help="NVLink NCCL bus bandwidth, GB/s (default 370)")
    p.add_argument("--ib-gbps", type=float, default=50.0, help="InfiniBand per GPU, GB/s (default 50)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def layout_from_args(train: str, gen: str) -> ParallelLayout:
    t = parse_sizes(train, ("tp", "pp", "dp", "vpp"), "--train")
    g = parse_sizes(gen, ("tp",), "--gen")
    if "dp" not in t:
        raise ValueError("--train needs dp= (the data-parallel size decides the world and the optimizer shards)")
    tp, pp, dp = t.get("tp", 1), t.get("pp", 1), t["dp"]
    return ParallelLayout.create(world=tp * pp * dp, tp=tp, pp=pp, dp=dp, vpp=t.get("vpp", 1), gen_tp=g.get("tp"))


def run(args) -> int:
    layout = layout_from_args(args.train, args.gen)
    spec = spec_from_hf(read_hf_config(args.hf_config), head="lm")
    options = PlanOptions(
        params_dtype=args.params_dtype, grad_dtype=args.grad_dtype, gen_dtype=args.gen_dtype, kv_dtype=args.kv_dtype,
        distributed_optimizer=args.distributed_optimizer, with_critic=args.with_critic, with_ref=args.with_ref,
        gpu_memory_gib=args.gpu_memory, reserve_gib=args.reserve_gib, seq_len=args.seq_len,
        micro_batch=args.micro_batch, gpus_per_node=args.gpus_per_node, nvlink_gbps=args.nvlink_gbps,
        ib_gbps=args.ib_gbps)
    plan = make_plan(spec, layout, options)
    print(json.dumps(plan, indent=1) if args.json else render(plan))
    return 0

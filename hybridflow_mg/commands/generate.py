"""`hybridflow-mg generate`: check a layout end to end before a long run.

Loads an HF model into the Megatron training layout, reshards it into the in-process vLLM engine's
generation layout, generates, and writes one JSON line per prompt: `prompt_ids`, `output_ids`,
`logprobs`, `finish_reason` (and `samples` when --n > 1). The prompts file holds JSON lines with
`prompt_ids`, or `prompt` text when the model directory has a tokenizer. `--nproc N` starts N local
processes (parallel/local_launch.py); under an existing launcher (torchrun, srun, mpirun) the command runs as is.
"""
from __future__ import annotations

import json
import os
import sys

from hybridflow_mg.commands._args import parse_sizes


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="HF model → Megatron layout → reshard → vLLM generate", description=__doc__)
    p.add_argument("--hf", required=True, help="HF model directory")
    p.add_argument("--train", default="tp=1,pp=1", metavar="tp=T,pp=P")
    p.add_argument("--gen", default="", metavar="tp=TG", help="generation tp (default: training tp)")
    p.add_argument("--nproc", type=int, default=None, help="start this many local processes (parallel/local_launch.py)")
    p.add_argument("--prompts", required=True, help="JSON lines with prompt_ids or prompt")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (temperature 0)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--out", default=None, help="output JSON lines (default: stdout)")
    p.set_defaults(run=run)


def read_prompts(path: str, model_dir: str) -> list[list[int]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts file {path!r} does not exist")
    prompts, tokenizer = [], None
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from None
            if "prompt_ids" in row:
                prompts.append([int(t) for t in row["prompt_ids"]])
            elif "prompt" in row:
                if tokenizer is None:
                    from hybridflow_mg.data.tokenizer import Tokenizer

                    tokenizer = Tokenizer.from_path(model_dir)
                prompts.append(tokenizer.encode(row["prompt"], add_bos=True))
            else:
                raise ValueError(f"{path}:{number}: a line needs 'prompt_ids' or 'prompt'")
    if not prompts:
        raise ValueError(f"prompts file {path!r} has no prompts")
    return prompts


def _stop_ids(hf_config: dict) -> tuple[int, ...]:
    eos = hf_config.get("eos_token_id")
    return tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())


def run(args) -> int:
    from hybridflow_mg.parallel.launch import discover

    if args.nproc is not None and args.nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {args.nproc}")
    if args.nproc and discover().world_size == 1:  # start the processes ourselves
        from hybridflow_mg.parallel.local_launch import launch_local, without_nproc

        return launch_local(args.nproc, without_nproc(args.argv))
    return _generate(args)


def _generate(args) -> int:
    import torch.distributed as dist

    from hybridflow_mg.parallel.grid import Grid
    from hybridflow_mg.parallel.launch import init_distributed
    from hybridflow_mg.parallel.layout import ParallelLayout
    from hybridflow_mg.models.build import build_model
    from hybridflow_mg.models.hf_io import HFSource, load_into_model
    from hybridflow_mg.models.hf_spec import check_layout, read_hf_config, spec_from_hf
    from hybridflow_mg.rollout.config import RolloutConfig
    from hybridflow_mg.rollout.hybrid_engine import HybridEngine
    from hybridflow_mg.rollout.vllm_engine import VLLMEngine

    t = parse_sizes(args.train, ("tp", "pp"), "--train")
    g = parse_sizes(args.gen, ("tp",), "--gen")
    hf_config = read_hf_config(args.hf)
    spec = spec_from_hf(hf_config)
    check_layout(spec, t.get("tp", 1), t.get("pp", 1))
    prompts = read_prompts(args.prompts, args.hf)
    info, device = init_distributed()
    layout = ParallelLayout.create(world=info.world_size, tp=t.get("tp", 1), pp=t.get("pp", 1), gen_tp=g.get("tp"))
    grid = Grid.create(layout, device)
    chunks, built = build_model(spec, grid, role="actor", dtype=args.dtype)
    load_into_model(chunks, HFSource(args.hf, spec.dims), tp=layout.tp, tp_rank=grid.train.tp, pp=layout.pp,
                    pp_rank=grid.train.pp)
    engine = VLLMEngine(args.hf, layout, RolloutConfig(dtype=args.dtype, max_new_tokens=args.max_tokens),
                        load_weights=False)
    hybrid = HybridEngine(grid, chunks, spec.dims, engine, naming=built.naming)
    stats = hybrid.sync_weights()
    sampling = engine.config.sampling(n=args.n, temperature=0.0 if args.greedy else args.temperature,
                                      max_new_tokens=args.max_tokens, seed=args.seed, stop_token_ids=_stop_ids(hf_config))
    with hybrid.generating():
        completions = hybrid.generate(prompts, sampling, whole_batch=True)
    if grid.is_logging_rank:
        out = open(args.out, "w") if args.out else sys.stdout
        for c in completions:
            first = c.samples[0]
            row = {"prompt_ids": c.prompt_token_ids, "output_ids": first.token_ids, "logprobs": first.logprobs,
                   "finish_reason": first.finish_reason}
            if len(c.samples) > 1:
                row["samples"] = [{"output_ids": s.token_ids, "logprobs": s.logprobs,
                                   "finish_reason": s.finish_reason} for s in c.samples]
            out.write(json.dumps(row) + "\n")
        if args.out:
            out.close()
        print(f"generated {len(completions)} prompts × {args.n} on {layout.describe()}; reshard received "
              f"{stats.recv_bytes / 1e6:.2f} MB per rank in {stats.collectives} collectives ({stats.seconds:.3f} s)",
              file=sys.stderr)
    engine.shutdown()
    grid.destroy()
    dist.destroy_process_group()
    return 0

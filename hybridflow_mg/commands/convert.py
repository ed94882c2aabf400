"""`hybridflow-mg convert`: an HF model directory → a Megatron checkpoint at (tp, pp[, vpp]).

Pure data conversion, no model is built: every shard file is assembled from safetensors slices, one
shard in memory at a time. Run it as one process for small models; under torchrun / srun / mpirun
the ranks split the shard files between them and rank 0 finishes the checkpoint.
"""
from __future__ import annotations

from hybridflow_mg.commands._args import launched_world


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="HF model directory → Megatron checkpoint", description=__doc__)
    p.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--vpp", type=int, default=1)
    p.add_argument("--role", default=None, choices=("actor", "ref", "critic", "reward"),
                   help="default: actor for *ForCausalLM, reward for *ForSequenceClassification")
    p.add_argument("--vocab-divisor", type=int, default=128, help="pad the vocab to a multiple of this × tp")
    p.set_defaults(run=run)


def run(args) -> int:
    from hybridflow_mg.checkpoint.megatron import convert
    from hybridflow_mg.models.build import ROLES
    from hybridflow_mg.models.hf_io import HFSource
    from hybridflow_mg.models.hf_spec import check_layout, read_hf_config, spec_from_hf

    hf_config = read_hf_config(args.hf)
    head = ROLES[args.role] if args.role else None
    spec = spec_from_hf(hf_config, head=head, vocab_divisor=args.vocab_divisor)
    role = args.role or ("reward" if spec.is_value_model else "actor")
    for name in ("tp", "pp", "vpp"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.vpp > 1 and args.pp == 1:
        raise ValueError(f"--vpp {args.vpp} needs --pp > 1")
    check_layout(spec, args.tp, args.pp, args.vpp)
    source = HFSource(args.hf, spec.dims)
    rank, world, barrier = launched_world()
    shards = [(t, p) for p in range(args.pp) for t in range(args.tp)][rank::world]
    convert(source, args.out, tp=args.tp, pp=args.pp, vpp=args.vpp, role=role, hf_config=hf_config,
            shards=shards, write_meta_file=False)
    barrier()
    if rank == 0:
        convert(source, args.out, tp=args.tp, pp=args.pp, vpp=args.vpp, role=role, hf_config=hf_config,
                shards=[], write_meta_file=True, tokenizer_dir=args.hf)
        print(f"wrote {args.out}: {role} at tp={args.tp} pp={args.pp} vpp={args.vpp} "
              f"({args.tp * args.pp} shard files, padded vocab {spec.dims.padded_vocab('mcore', args.tp)})")
    barrier()
    return 0

"""`hybridflow-mg export`: a Megatron checkpoint (any layout) → HF safetensors loadable by transformers.

Tensor by tensor: sharded output with an index, config.json from the checkpoint, tokenizer files
copied, vocab padding stripped. Under a launcher the ranks split the output files.
"""
from __future__ import annotations

from hybridflow_mg.commands._args import launched_world, parse_bytes


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="Megatron checkpoint → HF safetensors directory", description=__doc__)
    p.add_argument("--ckpt", required=True, help="checkpoint directory (written by convert or a training run)")
    p.add_argument("--out", required=True, help="HF directory to write")
    p.add_argument("--max-shard-size", default="2GB", help="largest output file, e.g. 500MB, 5GB")
    p.set_defaults(run=run)


def run(args) -> int:
    from pathlib import Path

    from hybridflow_mg.checkpoint.megatron import MegatronSource
    from hybridflow_mg.models.hf_io import export_hf

    source = MegatronSource(args.ckpt)
    rank, world, barrier = launched_world()
    tokenizer = Path(args.ckpt) / "tokenizer"
    out = export_hf(source, args.out, source.meta.hf_config, max_shard_bytes=parse_bytes(args.max_shard_size),
                    tokenizer_dir=tokenizer if tokenizer.is_dir() else None, rank=rank, world_size=world,
                    barrier=barrier)
    if rank == 0:
        print(f"wrote {out} from {args.ckpt} (saved at tp={source.meta.tp} pp={source.meta.pp})")
    return 0

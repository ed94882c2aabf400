"""`hybridflow-mg convert`: an HF model directory → a Megatron checkpoint at (tp, pp[, vpp]).

Pure data conversion, no model is built: every shard file is assembled from safetensors slices, one
shard in memory at a time. Run it as one process for small models; under torchrun / srun / mpirun
the ranks split the shard files between them and rank 0 finishes the checkpoint. The checkpoint is
written into `OUT.partial` and moved into place when complete, so `--out` holds either nothing, the
checkpoint it held before (`--overwrite`), or the new one: never a mix of the two.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from hybridflow_mg.commands._args import launched_world

CHECKPOINT_ENTRIES = frozenset({"hybridflow.json", "hybridflow.json.tmp", "model", "tokenizer"})
"""What `convert` puts in a checkpoint directory: the only contents `--overwrite` may replace."""


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="HF model directory → Megatron checkpoint", description=__doc__)
    p.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="checkpoint directory to write (new, empty, or see --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a checkpoint already at --out (the old one stays until the new one is complete)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--vpp", type=int, default=1)
    p.add_argument("--role", default=None, choices=("actor", "ref", "critic", "reward"),
                   help="default: actor for *ForCausalLM, reward for *ForSequenceClassification")
    p.add_argument("--vocab-divisor", type=int, default=128, help="pad the vocab to a multiple of this × tp")
    p.set_defaults(run=run)


def check_out(out: Path, *, overwrite: bool) -> None:
    """One-line ValueError when `out` cannot take a new checkpoint: a file, a folder holding other
    things, a checkpoint without `--overwrite`, or a place this process cannot write."""
    where = f"--out {str(out)!r}"
    if out.exists() and not out.is_dir():
        raise ValueError(f"{where} is a file; give a directory path for the checkpoint")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not overwrite:
        what = "already holds a checkpoint" if "hybridflow.json" in entries else "is not empty"
        raise ValueError(f"{where} {what}; pass --overwrite to replace it, or choose a new directory")
    foreign = [e for e in entries if e not in CHECKPOINT_ENTRIES]
    if foreign:
        raise ValueError(f"{where} holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, which is no "
                         f"checkpoint; --overwrite replaces only a checkpoint, so choose a new directory")
    parent = out.absolute().parent
    while not parent.exists():  # the nearest folder that exists: convert makes the rest
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{where}: {str(parent)!r} is a file, so no directory can be made there; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{where}: cannot write in {str(parent)!r} (permission denied); choose a directory you can write")


def run(args) -> int:
    from hybridflow_mg.checkpoint.megatron import convert
    from hybridflow_mg.checkpoint.training import partial_dir, replace_dir, start_partial
    from hybridflow_mg.models.build import ROLES
    from hybridflow_mg.models.hf_io import HFSource, hf_model_dir
    from hybridflow_mg.models.hf_spec import check_layout, read_hf_config, spec_from_hf

    hf_config = read_hf_config(hf_model_dir(args.hf))
    head = ROLES[args.role] if args.role else None
    spec = spec_from_hf(hf_config, head=head, vocab_divisor=args.vocab_divisor)
    role = args.role or ("reward" if spec.is_value_model else "actor")
    for name in ("tp", "pp", "vpp"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.vpp > 1 and args.pp == 1:
        raise ValueError(f"--vpp {args.vpp} needs --pp > 1")
    check_layout(spec, args.tp, args.pp, args.vpp)
    out = Path(args.out)
    check_out(out, overwrite=args.overwrite)
    source = HFSource(args.hf, spec.dims)
    rank, world, barrier = launched_world()
    tmp = partial_dir(out)
    if rank == 0:
        try:
            start_partial(out)
        except OSError as e:
            raise ValueError(f"--out {args.out!r}: cannot create {str(tmp)!r} ({e.strerror}); "
                             f"choose a directory you can write") from None
    barrier()
    shards = [(t, p) for p in range(args.pp) for t in range(args.tp)][rank::world]
    try:
        convert(source, tmp, tp=args.tp, pp=args.pp, vpp=args.vpp, role=role, hf_config=hf_config,
                shards=shards, write_meta_file=False)
        barrier()
        if rank == 0:
            convert(source, tmp, tp=args.tp, pp=args.pp, vpp=args.vpp, role=role, hf_config=hf_config,
                    shards=[], write_meta_file=True, tokenizer_dir=args.hf)
            replace_dir(tmp, out)
    except BaseException:
        if rank == 0:  # a failed conversion leaves --out as it was, and no partial folder beside it
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rank == 0:
        print(f"wrote {args.out}: {role} at tp={args.tp} pp={args.pp} vpp={args.vpp} "
              f"({args.tp * args.pp} shard files, padded vocab {spec.dims.padded_vocab('mcore', args.tp)})")
    barrier()
    return 0

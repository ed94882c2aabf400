"""`hybridflow-mg export`: a Megatron checkpoint (any layout) → HF safetensors loadable by transformers.

Tensor by tensor: sharded output with an index, config.json from the checkpoint, tokenizer files
copied, vocab padding stripped. Under a launcher the ranks split the output files. A checkpoint with
NaN or inf in any tensor is refused before anything is written (`--allow-nonfinite` exports it anyway).
"""
from __future__ import annotations

from pathlib import Path

from hybridflow_mg.commands._args import launched_world, parse_bytes


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="Megatron checkpoint → HF safetensors directory", description=__doc__)
    p.add_argument("--ckpt", required=True, help="checkpoint directory (written by convert or a training run)")
    p.add_argument("--out", required=True, help="HF directory to write")
    p.add_argument("--max-shard-size", default="2GB", help="largest output file, e.g. 500MB, 5GB")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="export even if a tensor holds NaN or inf (by default the first such tensor is named "
                        "and nothing is written)")
    p.set_defaults(run=run)


def find_nonfinite(ckpt_dir: Path, shards: list[tuple[int, int]]) -> str | None:
    """The first tensor of the checkpoint's `shards` ((tp, pp) ranks) holding NaN or inf, described in
    one line; None if none.

    Reads each shard once, one tensor in memory at a time; max and min propagate NaN and show inf,
    so a finite tensor costs two reductions and no tensor-sized mask.
    """
    import torch
    from safetensors import safe_open

    from hybridflow_mg.checkpoint.megatron import shard_file

    for tp_rank, pp_rank in shards:
        path = ckpt_dir / shard_file(tp_rank, pp_rank)
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as e:  # noqa: BLE001 - a missing, truncated or corrupt file
            raise ValueError(f"checkpoint shard {str(path)!r} cannot be read ({e}); re-save or re-convert it") from None
        with handle as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if not t.is_floating_point() or t.numel() == 0:
                    continue
                if torch.isfinite(t.max()) and torch.isfinite(t.min()):
                    continue
                nans, infs = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
                return f"tensor {key!r} in {str(path)!r} has {nans} NaN and {infs} inf values"
    return None


def run(args) -> int:
    from hybridflow_mg.checkpoint.megatron import MegatronSource
    from hybridflow_mg.models.hf_io import export_hf

    max_shard_bytes = parse_bytes(args.max_shard_size)
    source = MegatronSource(args.ckpt)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {args.out!r} is a file; give a directory path for the HF model")
    rank, world, barrier = launched_world()
    if not args.allow_nonfinite:  # the ranks split the shards; every rank gets the verdict before any writes
        shards = [(t, p) for p in range(source.meta.pp) for t in range(source.meta.tp)][rank::world]
        try:
            mine = find_nonfinite(Path(args.ckpt), shards)
            if mine:
                mine = (f"{mine}; the checkpoint is broken (a diverged run?): export an earlier one, or pass "
                        "--allow-nonfinite to export it as is")
        except ValueError as e:  # an unreadable shard: every rank must hear of it, not wait for this one
            mine = str(e)
        verdicts = [mine]
        if world > 1:
            import torch.distributed as dist

            verdicts = [None] * world
            dist.all_gather_object(verdicts, mine)
        bad = next((v for v in verdicts if v), None)
        if bad:
            raise ValueError(bad)
    tokenizer = Path(args.ckpt) / "tokenizer"
    out = export_hf(source, args.out, source.meta.hf_config, max_shard_bytes=max_shard_bytes,
                    tokenizer_dir=tokenizer if tokenizer.is_dir() else None, rank=rank, world_size=world,
                    barrier=barrier)
    if rank == 0:
        print(f"wrote {out} from {args.ckpt} (saved at tp={source.meta.tp} pp={source.meta.pp})")
    return 0

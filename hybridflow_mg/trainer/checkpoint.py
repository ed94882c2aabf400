"""Save the actor as a Megatron checkpoint (checkpoint/megatron.py format), exportable to HF.

Every rank of data-parallel index 0 writes its own (tp, pp) shard file with global layer names;
after a barrier the logging rank writes the meta file last, so an interrupted save leaves no
checkpoint. `hybridflow-mg export --ckpt DIR --out HF_DIR` turns it into an HF model.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch.distributed as dist

from hybridflow_mg.checkpoint.megatron import META, CheckpointMeta, save_shard, write_meta
from hybridflow_mg.models.hf_io import TOKENIZER_FILES, model_params
from hybridflow_mg.models.layouts import name


def save_actor(run, directory: Path) -> Path:
    grid, lay, dims = run.grid, run.grid.layout, run.spec.dims
    directory.mkdir(parents=True, exist_ok=True)
    if grid.is_logging_rank:
        (directory / META).unlink(missing_ok=True)
    dist.barrier()
    params = list(model_params(run.actor.modules, dims, pp=lay.pp, pp_rank=grid.train.pp, vpp=lay.vpp,
                               naming=run.naming))
    if grid.train.dp == 0:
        save_shard(directory, grid.train.tp, grid.train.pp, {name(rule, "mcore", layer): p for rule, layer, _, p in params})
    dist.barrier()
    if grid.is_logging_rank:
        import json
        import shutil

        source = Path(run.cfg.model.path)
        (directory / "tokenizer").mkdir(exist_ok=True)
        for file in TOKENIZER_FILES:
            if (source / file).is_file():
                shutil.copy2(source / file, directory / "tokenizer" / file)
        hf_config = json.loads((source / "config.json").read_text())
        dtype = str(params[0][3].dtype).removeprefix("torch.")
        write_meta(directory, CheckpointMeta(hf_config=hf_config, dims=asdict(dims), tp=lay.tp, pp=lay.pp,
                                             vpp=lay.vpp, role="actor", dtype=dtype))
    dist.barrier()
    return directory

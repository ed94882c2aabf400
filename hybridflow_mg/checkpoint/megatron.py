"""Megatron checkpoints on disk: one safetensors file per (tp, pp) shard, plus `hybridflow.json`.

Layout of a checkpoint directory:

    hybridflow.json                     format, HF config, layout (tp, pp, vpp), role, dtype — written LAST
    model/mp_rank_TT_PPP.safetensors    the TP shard TT of pipeline stage PPP, megatron-core local-spec
                                        names with GLOBAL layer numbers (so vpp chunking is irrelevant)
    tokenizer/                          tokenizer files, when the source had them

A directory without `hybridflow.json` is not a checkpoint (an interrupted save leaves none), and
every shard file is written under a temporary name and renamed when complete. `MegatronSource`
serves canonical rows (see `models.hf_io.CanonicalSource`) from the shards of any layout, so a
checkpoint saved at one (tp, pp) loads at another, and exports to HF tensor by tensor.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hybridflow_mg.models.layouts import ModelDims, ParamRule, check_pp, check_split, layer_location, name, rules_for
from hybridflow_mg.models.rowmaps import index_to_runs, locate, shard_index
from hybridflow_mg.utils.files import write_text_atomic

FORMAT = "hybridflow_mg.megatron/1"
META = "hybridflow.json"


def shard_file(tp_rank: int, pp_rank: int) -> str:
    return f"model/mp_rank_{tp_rank:02d}_{pp_rank:03d}.safetensors"


@dataclass(frozen=True)
class CheckpointMeta:
    hf_config: dict
    dims: dict
    tp: int
    pp: int
    vpp: int
    role: str
    dtype: str
    format: str = FORMAT

    @property
    def model_dims(self) -> ModelDims:
        return ModelDims(**self.dims)


def write_meta(ckpt_dir: str | os.PathLike, meta: CheckpointMeta) -> None:
    write_text_atomic(Path(ckpt_dir) / META, json.dumps(asdict(meta), indent=2))


def read_meta(ckpt_dir: str | os.PathLike) -> CheckpointMeta:
    path = Path(ckpt_dir) / META
    if not path.is_file():
        raise FileNotFoundError(f"{str(ckpt_dir)!r} is not a hybridflow_mg checkpoint (no {META}); "
                                f"was the save interrupted? Use `hybridflow-mg convert` to make one")
    try:
        raw = json.loads(path.read_text())
        meta = CheckpointMeta(**raw)
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{str(path)!r} is corrupt ({e}); restore it from a backup or re-convert") from None
    if meta.format != FORMAT:
        raise ValueError(f"{str(path)!r} has format {meta.format!r}; this version reads {FORMAT!r}")
    return meta


def stage_tensor_names(dims: ModelDims, pp_rank: int, pp: int, vpp: int) -> list[tuple[ParamRule, int | None]]:
    """(rule, global layer) of every tensor that pipeline stage `pp_rank` holds."""
    out = []
    for rule in rules_for(dims):
        if rule.per_layer:
            out += [(rule, layer) for layer in range(dims.num_layers)
                    if layer_location(layer, dims.num_layers, pp, vpp)[0] == pp_rank]
        elif (rule.key == "embedding" and pp_rank == 0) or (rule.key != "embedding" and pp_rank == pp - 1):
            out.append((rule, None))
    return out


def save_shard(ckpt_dir: str | os.PathLike, tp_rank: int, pp_rank: int, tensors: dict[str, torch.Tensor]) -> Path:
    """Write one shard file atomically (temporary name, then rename)."""
    path = Path(ckpt_dir) / shard_file(tp_rank, pp_rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata={"format": FORMAT})
    os.replace(tmp, path)
    return path


def convert(source, ckpt_dir: str | os.PathLike, *, tp: int, pp: int, vpp: int = 1, role: str, hf_config: dict,
            shards: Iterable[tuple[int, int]] | None = None, write_meta_file: bool = True,
            tokenizer_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write the (tp, pp) shards of `source` (any canonical source); one shard in memory at a time.

    `shards` picks which (tp_rank, pp_rank) files this process writes (a launcher splits them over
    ranks); the meta file is written last, by whoever passes `write_meta_file=True` after all
    shards exist.
    """
    dims = source.dims
    check_split(dims, "mcore", tp)
    check_pp(dims.num_layers, pp, vpp)
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / META).unlink(missing_ok=True)  # until the new meta is written, this is no checkpoint
    written = []
    for tp_rank, pp_rank in (shards if shards is not None else [(t, p) for p in range(pp) for t in range(tp)]):
        tensors = {name(rule, "mcore", layer): source.rows(rule, layer, shard_index(rule, "mcore", dims, tp, tp_rank))
                   for rule, layer in stage_tensor_names(dims, pp_rank, pp, vpp)}
        written.append(save_shard(ckpt_dir, tp_rank, pp_rank, tensors))
    if tokenizer_dir is not None:
        from hybridflow_mg.models.hf_io import copy_tokenizer_files

        copy_tokenizer_files(tokenizer_dir, ckpt_dir / "tokenizer")
    if write_meta_file:
        missing = [shard_file(t, p) for p in range(pp) for t in range(tp) if not (ckpt_dir / shard_file(t, p)).is_file()]
        if missing:
            raise FileNotFoundError(f"cannot finish {str(ckpt_dir)!r}: shard {missing[0]} was not written")
        dtype = str(source.dtype).removeprefix("torch.")
        write_meta(ckpt_dir, CheckpointMeta(hf_config=hf_config, dims=asdict(dims), tp=tp, pp=pp, vpp=vpp,
                                            role=role, dtype=dtype))
    return written


class MegatronSource:
    """Canonical rows from a checkpoint's shard files, whatever layout it was saved at."""

    def __init__(self, ckpt_dir: str | os.PathLike):
        self.dir = Path(ckpt_dir)
        self.meta = read_meta(self.dir)
        self.dims = self.meta.model_dims
        self._handles: dict[tuple[int, int], object] = {}
        self._where: dict[str, dict[int, tuple[int, int]]] = {}  # tensor name → {tp_rank: (tp_rank, pp_rank)}
        for pp_rank in range(self.meta.pp):
            for tp_rank in range(self.meta.tp):
                for key in self._open(tp_rank, pp_rank).keys():
                    self._where.setdefault(key, {})[tp_rank] = (tp_rank, pp_rank)
        self.close()  # files are mapped per read (see HFCheckpoint.opened for why)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.meta.dtype)

    def _open(self, tp_rank: int, pp_rank: int):
        if (tp_rank, pp_rank) not in self._handles:
            path = self.dir / shard_file(tp_rank, pp_rank)
            if not path.is_file():
                raise FileNotFoundError(f"checkpoint {str(self.dir)!r} is missing its shard {shard_file(tp_rank, pp_rank)}")
            try:
                self._handles[(tp_rank, pp_rank)] = safe_open(str(path), framework="pt").__enter__()
            except Exception as e:  # noqa: BLE001 - a truncated or corrupt file
                raise ValueError(f"checkpoint shard {str(path)!r} is corrupt ({e}); re-save or re-convert it") from None
        return self._handles[(tp_rank, pp_rank)]

    def rows(self, rule: ParamRule, layer: int | None, index: torch.Tensor) -> torch.Tensor:
        key = name(rule, "mcore", layer)
        holders = self._where.get(key)
        if not holders or len(holders) != self.meta.tp:
            raise ValueError(f"checkpoint {str(self.dir)!r} lacks {key} on some tensor-parallel shard; it is incomplete")
        dim = rule.index_dim
        out = None
        for tp_rank, where in sorted(holders.items()):
            piece = self._open(*where).get_slice(key)
            if out is None:
                shape = list(piece.get_shape())
                shape[dim] = len(index)
                out = torch.zeros(shape, dtype=piece[0:1].dtype)
            src_index = shard_index(rule, "mcore", self.dims, self.meta.tp, tp_rank)
            if piece.get_shape()[dim] != len(src_index):
                raise ValueError(f"{key} in shard {where} has {piece.get_shape()[dim]} rows, the layout says "
                                 f"{len(src_index)}; the checkpoint does not match its {META}")
            for dst, src, length in index_to_runs(locate(index, src_index)):
                out.narrow(dim, dst, length).copy_(piece[src:src + length] if dim == 0 else piece[:, src:src + length])
        self.close()
        return out

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()

"""HF safetensors in and out, streaming: no process ever holds a whole model.

Reading goes through one interface, a *canonical source*: `rows(rule, layer, index)` returns the rows
(along the rule's split dim) of a parameter's canonical tensor named by a row map, zeros where the
map says padding (-1). `HFSource` serves them from an HF checkpoint by safetensors slices, so a rank
reads only its own rows: per-rank memory is bounded by its shard plus, for column slices of
row-parallel weights, the pages of one tensor. `checkpoint.megatron.MegatronSource` serves the same
rows from a Megatron checkpoint of any layout. Import, export, conversion and checkpoint loading
are all "rows from a source into a destination".
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hybridflow_mg.models.layouts import ModelDims, ParamRule, global_layer, hf_names, hf_shapes, match, rules_for
from hybridflow_mg.models.rowmaps import index_to_runs, shard_index

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")
GENERATION_CONFIG = "generation_config.json"  # listed with the tokenizer's files, but the model's


def copy_tokenizer_files(source: str | os.PathLike, out_dir: str | os.PathLike, *,
                         model_dir: str | os.PathLike | None = None) -> None:
    """Copy the tokenizer at `source` into `out_dir` (made when missing): the `TOKENIZER_FILES` an HF
    directory holds, or a sentencepiece `.model` file as `tokenizer.model`. `generation_config.json`
    (the model's sampling defaults) comes from `model_dir` when given, else from `source`."""
    source, out = Path(source), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if source.is_file():
        shutil.copy2(source, out / "tokenizer.model")
        files = []
    else:
        files = [source / f for f in TOKENIZER_FILES if f != GENERATION_CONFIG or model_dir is None]
    if model_dir is not None:
        files.append(Path(model_dir) / GENERATION_CONFIG)
    for file in files:
        if file.is_file():
            shutil.copy2(file, out / file.name)


class CanonicalSource(Protocol):
    dims: ModelDims
    dtype: torch.dtype

    def rows(self, rule: ParamRule, layer: int | None, index: torch.Tensor) -> torch.Tensor:
        """Rows `index` (−1 = zeros) of the canonical tensor of `rule` at global `layer`."""


def _part_bounds(rule: ParamRule, dims: ModelDims) -> list[tuple[int, int]]:
    """[start, stop) of each HF source inside the canonical tensor along the split dim."""
    if rule.index_dim == 1:
        return [(0, dims.extent(rule.trailing[0]))]
    bounds, start = [], 0
    for part in rule.parts:
        bounds.append((start, start + dims.extent(part)))
        start += dims.extent(part)
    return bounds


def read_runs(index: torch.Tensor, dim: int, out_shape: tuple[int, ...], dtype: torch.dtype,
              bounds: list[tuple[int, int]], read) -> torch.Tensor:
    """Assemble rows `index` of a canonical tensor whose dim-`dim` range is split into sources.

    `read(source_number, start, stop)` returns rows [start, stop) of that source along `dim`.
    """
    out = torch.zeros(out_shape, dtype=dtype)
    for dst, src, length in index_to_runs(index):
        while length:
            part = next(i for i, (a, b) in enumerate(bounds) if a <= src < b)
            a, b = bounds[part]
            take = min(length, b - src)
            out.narrow(dim, dst, take).copy_(read(part, src - a, src - a + take))
            dst, src, length = dst + take, src + take, length - take
    return out


def hf_model_dir(path: str | os.PathLike, flag: str = "--hf") -> Path:
    """`path` as an HF model directory (one holding config.json); a one-line error naming `flag` otherwise."""
    p = Path(path)
    fix = "point it to an HF model directory (config.json + *.safetensors)"
    if not p.exists():
        raise FileNotFoundError(f"{flag} {str(p)!r} does not exist; {fix}")
    if not p.is_dir():
        raise ValueError(f"{flag} {str(p)!r} is a file, not a directory; point it to the folder that holds "
                         f"config.json and the weights (perhaps {str(p.parent)!r})")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{flag} {str(p)!r} has no config.json; {fix}")
    return p


class HFCheckpoint:
    """The tensors of an HF model directory (`model.safetensors` or a sharded index), opened lazily."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            try:
                self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{str(index)!r} is not a safetensors index ({e})") from None
            for file in sorted(set(self.weight_map.values())):
                if not (self.dir / file).is_file():
                    raise FileNotFoundError(f"shard {file!r} listed in {str(index)!r} is missing; re-download or re-export the model")
        elif single.is_file():
            with self._open(single) as f:
                self.weight_map = {k: single.name for k in f.keys()}
        else:
            raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {str(self.dir)!r}")
        self._handles: dict[str, object] = {}
        self._depth = 0

    @contextlib.contextmanager
    def opened(self):
        """Keep files open for a batch of reads, then unmap them.

        safetensors maps files into memory; pages a read touched stay in this process's RSS while the
        file is mapped. Closing after each parameter keeps a rank's footprint at its shard plus the
        pages of one tensor, instead of every page it ever touched.
        """
        self._depth += 1
        try:
            yield self
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.close()

    @staticmethod
    def _open(path: Path):
        try:
            return safe_open(str(path), framework="pt")
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for bad headers
            raise ValueError(f"cannot read safetensors file {str(path)!r}: {e}") from None

    def _slice(self, name: str):
        if name not in self.weight_map:
            raise ValueError(f"tensor {name!r} is missing from the checkpoint in {str(self.dir)!r}")
        file = self.weight_map[name]
        if file not in self._handles:
            self._handles[file] = self._open(self.dir / file).__enter__()
        return self._handles[file].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        s = self._slice(name)
        if dim is None:
            return s[:]
        return s[start:stop] if dim == 0 else s[:, start:stop]

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()


class HFSource:
    """Canonical rows from an HF checkpoint; checks every tensor's shape against config.json first use."""

    def __init__(self, directory: str | os.PathLike, dims: ModelDims):
        self.ckpt = HFCheckpoint(directory)
        self.dims = dims
        self._checked: set[str] = set()

    def _check(self, rule: ParamRule, layer: int | None) -> list[str]:
        names = list(hf_names(rule, layer))
        for name, want in zip(names, hf_shapes(rule, self.dims)):
            if name not in self._checked:
                got = self.ckpt.shape(name)
                if got != tuple(want):
                    raise ValueError(f"weight {name} has shape {list(got)} but config.json implies {list(want)}; "
                                     f"the checkpoint does not match its config")
                self._checked.add(name)
        return names

    @property
    def dtype(self) -> torch.dtype:
        with self.ckpt.opened():
            return self.ckpt.read(next(iter(self.ckpt.weight_map)), 0, 0, 1).dtype

    def rows(self, rule: ParamRule, layer: int | None, index: torch.Tensor) -> torch.Tensor:
        names = self._check(rule, layer)
        dim = rule.index_dim
        shape = [sum(self.dims.extent(p) for p in rule.parts), *(self.dims.extent(t) for t in rule.trailing)]
        shape[dim] = len(index)
        with self.ckpt.opened():
            dtype = self.ckpt.read(names[0], 0, 0, 1).dtype
            return read_runs(index, dim, tuple(shape), dtype, _part_bounds(rule, self.dims),
                             lambda part, a, b: self.ckpt.read(names[part], dim, a, b))


def model_params(chunks: list[torch.nn.Module], dims: ModelDims, *, pp: int, pp_rank: int, vpp: int = 1,
                 naming: str = "local") -> Iterator[tuple[ParamRule, int | None, str, torch.nn.Parameter]]:
    """(rule, global layer, name, parameter) of every parameter of this rank's model chunks.

    The last stage's copy of tied embeddings (`output_layer.weight` with pp > 1) is skipped: it is the
    embedding, owned by the first stage.
    """
    rules = rules_for(dims)
    for vp, chunk in enumerate(chunks):
        for name, param in chunk.named_parameters():
            found = match(rules, "mcore", name, spec=naming)
            if found is None and name == "output_layer.weight" and dims.tie_embeddings:
                continue
            if found is None:
                raise ValueError(f"parameter {name} has no layout rule; the model and its spec disagree")
            rule, local, _ = found
            layer = global_layer(pp_rank, local, dims.num_layers, pp, vpp, vp) if rule.per_layer else None
            yield rule, layer, name, param


def load_into_model(chunks: list[torch.nn.Module], source: CanonicalSource, *, tp: int, tp_rank: int, pp: int,
                    pp_rank: int, vpp: int = 1, naming: str = "local", skip: tuple[str, ...] = ()) -> int:
    """Fill every parameter of this rank's model chunks from `source`; returns the bytes loaded.

    `skip` names rules to leave as built (e.g. ``("value_head",)`` for a critic that starts from the
    actor's weights: the trunk comes from the checkpoint, the head keeps its initialisation). The
    last stage's copy of tied embeddings is filled from the embedding.
    """
    dims = source.dims
    loaded = 0
    tied_copy = [p for c in chunks for n, p in c.named_parameters() if n == "output_layer.weight"] \
        if dims.tie_embeddings else []
    embedding = next(r for r in rules_for(dims) if r.key == "embedding")
    targets = [(rule, layer, name, param) for rule, layer, name, param in
               model_params(chunks, dims, pp=pp, pp_rank=pp_rank, vpp=vpp, naming=naming)]
    targets += [(embedding, None, "output_layer.weight", p) for p in tied_copy]
    for rule, layer, name, param in targets:
        if rule.key in skip:
            continue
        data = source.rows(rule, layer, shard_index(rule, "mcore", dims, tp, tp_rank))
        if data.shape != param.shape:
            raise ValueError(f"{name}: source gives {list(data.shape)}, the model has {list(param.shape)}")
        with torch.no_grad():
            param.copy_(data)
        loaded += data.numel() * data.element_size()
    return loaded


def _units(dims: ModelDims) -> list[tuple[ParamRule, int | None]]:
    """Every (rule, global layer) of a model in HF state-dict order: the unit of export."""
    return [(rule, layer) for rule in rules_for(dims)
            for layer in (range(dims.num_layers) if rule.per_layer else [None])]


def hf_tensors(source: CanonicalSource, units: Iterable[tuple[ParamRule, int | None]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The HF tensors of `units`, rebuilt from `source` one canonical tensor at a time (padding stripped)."""
    from hybridflow_mg.models.rowmaps import from_canonical

    dims = source.dims
    for rule, layer in units:
        size = sum(dims.extent(p) for p in rule.parts) if rule.index_dim == 0 else dims.extent(rule.trailing[0])
        canonical = source.rows(rule, layer, torch.arange(size))
        yield from zip(hf_names(rule, layer), from_canonical(rule, canonical, dims))


def plan_hf_files(dims: ModelDims, element_size: int, max_shard_bytes: int) -> list[list[tuple[ParamRule, int | None]]]:
    """Output files of an export, planned from shapes alone so that ranks can split them."""
    files: list[list] = [[]]
    size = 0
    for rule, layer in _units(dims):
        nbytes = element_size * sum(torch.Size(s).numel() for s in hf_shapes(rule, dims))
        if files[-1] and size + nbytes > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append((rule, layer))
        size += nbytes
    return files


def hf_file_names(num_files: int) -> list[str]:
    if num_files == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{num_files:05d}.safetensors" for i in range(num_files)]


def _is_hf_export(path: Path) -> bool:
    """An HF model folder (what an export writes): config.json, safetensors, nothing else but tokenizer files."""
    names = {p.name for p in path.iterdir()}
    weights = {n for n in names if n.endswith(".safetensors") or n == "model.safetensors.index.json"}
    return "config.json" in names and bool(weights) and names <= weights | {"config.json", *TOKENIZER_FILES}


def export_hf(source: CanonicalSource, out_dir: str | os.PathLike, hf_config: dict, *, max_shard_bytes: int = 2 << 30,
              tokenizer_dir: str | os.PathLike | None = None, rank: int = 0, world_size: int = 1,
              barrier=lambda: None) -> Path:
    """Write the model of `source` as HF safetensors (+ index), config.json and tokenizer files.

    Holds one canonical tensor and one output file in memory. Under a launcher pass rank,
    world_size and a barrier: rank r writes files r, r+world, ...; rank 0 writes the index and
    config and moves the finished folder into place, so `out_dir` appears only when complete.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if out_dir.exists() and any(out_dir.iterdir()) and not _is_hf_export(out_dir):
        raise ValueError(f"output folder {str(out_dir)!r} is not empty and is not an HF model; "
                         f"choose a new folder (an earlier export there would be replaced)")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    element_size = torch.empty((), dtype=source.dtype).element_size()
    plan = plan_hf_files(source.dims, element_size, max_shard_bytes)
    names = hf_file_names(len(plan))
    weight_map = {}
    for i, units in enumerate(plan):
        tensors = dict(hf_tensors(source, units)) if i % world_size == rank else {}
        if tensors:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / names[i]), metadata={"format": "pt"})
        weight_map.update({n: names[i] for rule, layer in units for n in hf_names(rule, layer)})
    barrier()
    if rank == 0:
        if len(plan) > 1:
            total = sum(element_size * torch.Size(s).numel() for units in plan for rule, _ in units
                        for s in hf_shapes(rule, source.dims))
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    barrier()
    return out_dir

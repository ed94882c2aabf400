"""The per-tensor weight sync that peers ship today, written plainly: the baseline `Resharder` is measured against.

For every training tensor, one at a time (a generator over the model, as peers feed their engine):

1. TP-split tensors are all-gathered over the training TP group (`dist.all_gather` into a list) and
   merged into the full canonical tensor by the row maps (Megatron vocab padding dropped, fc1's
   `[gate_r; up_r]` shards interleaved back, qkv head groups put in canonical order). Replicated
   tensors (norms) are already whole and skip this step, as peers skip it.
2. The full tensor is broadcast over the training PP group from the stage that owns it, so every rank
   receives the whole model: M − (its own shards) bytes, about M per rank for large t·p.
3. Each full tensor is cut into this rank's destination (vLLM's per-rank layout: `take_shard` with
   the vLLM row map of its generation tp rank) and copied in.

That is 1–2 collectives per tensor and a full-size temporary per tensor, against `Resharder`'s one
collective per bucket and (d_g − 1)/(t·p)·M bytes. Bytes and calls are counted at the collectives as
`Resharder` counts them (received from other ranks only); peak extra memory is the largest set of
temporaries alive at once, tracked by hand at every allocation and release.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hybridflow_mg.parallel.layout import ParallelLayout
from hybridflow_mg.models.layouts import ModelDims, ParamRule, canonical_shape, layer_location, rules_for
from hybridflow_mg.models.rowmaps import put_shard, shard_index, take_shard

Unit = tuple[str, int | None]
"""(rule key, global layer or None): one logical parameter of the model."""


@dataclass
class BaselineStats:
    recv_bytes: int
    """Bytes received from other ranks, counted at the collectives (own shard in the all-gather excluded)."""
    collectives: int
    seconds: float
    peak_buffer_bytes: int
    """Largest sum of temporaries (gathered list, full tensor, converted shard) alive at once."""


class _Meter:
    """Bytes of live temporaries, and their high-water mark."""

    def __init__(self):
        self.live = self.peak = 0

    def alloc(self, *tensors: torch.Tensor) -> None:
        self.live += sum(t.numel() * t.element_size() for t in tensors)
        self.peak = max(self.peak, self.live)

    def free(self, *tensors: torch.Tensor) -> None:
        self.live -= sum(t.numel() * t.element_size() for t in tensors)


def owner_stage(rule: ParamRule, layer: int | None, dims: ModelDims, layout: ParallelLayout) -> int:
    """Training pipeline stage that holds the parameter: its layer's stage; embedding first, the rest last."""
    if rule.per_layer:
        return layer_location(layer, dims.num_layers, layout.pp, layout.vpp)[0]
    return 0 if rule.key == "embedding" else layout.pp - 1


def model_units(dims: ModelDims) -> list[tuple[ParamRule, int | None]]:
    """Every parameter in module order (embedding, layer by layer, final norm, head): the sync order."""
    rules = rules_for(dims)
    first = [r for r in rules if not r.per_layer and r.key == "embedding"]
    layered = [r for r in rules if r.per_layer]
    last = [r for r in rules if not r.per_layer and r.key != "embedding"]
    return ([(r, None) for r in first] + [(r, layer) for layer in range(dims.num_layers) for r in layered]
            + [(r, None) for r in last])


class PerTensorBaseline:
    """Gather-then-broadcast weight sync of one rank, tensor by tensor, into vLLM per-rank destinations.

    `sources[(key, layer)]`: this rank's Megatron shard of every parameter its stage holds;
    `dests[(key, layer)]`: every vLLM parameter of this rank (generation tp rank from `layout`).
    `tp_group` / `pp_group`: the training TP and PP groups (`Grid.tp_group`, `Grid.pp_group`).
    Row maps are computed here, once, so `run` times only the sync itself (to the baseline's favour:
    peers recompute their splits every sync).
    """

    def __init__(self, dims: ModelDims, layout: ParallelLayout, rank: int, sources: dict[Unit, torch.Tensor],
                 dests: dict[Unit, torch.Tensor], *, tp_group: dist.ProcessGroup | None,
                 pp_group: dist.ProcessGroup | None):
        if layout.gen_pp != 1:
            raise ValueError("the baseline writes generation pp=1 layouts; set gen pp=1")
        if not sources:
            raise ValueError(f"rank {rank} holds no training tensors")
        self.dims, self.layout = dims, layout
        self.stage = layout.train_coord(rank).pp
        self.tp_group, self.pp_group = tp_group, pp_group
        self.pp_ranks = next(g for g in layout.pp_groups if rank in g)  # position in the group = stage
        self.sources, self.dests = sources, dests
        self.dtype = next(iter(sources.values())).dtype  # the training dtype: what every broadcast carries
        gen_tp, gen = layout.gen_tp, layout.gen_coord(rank)
        device = next(iter(sources.values())).device
        self.steps = []  # (key, rule, owner stage, Megatron row map of each TP rank or None, vLLM row map)
        for rule, layer in model_units(dims):
            key = (rule.key, layer)
            stage = owner_stage(rule, layer, dims, layout)
            if (stage == self.stage) != (key in sources):
                raise ValueError(f"rank {rank} (stage {self.stage}): sources and the layout disagree on {key}")
            if key not in dests:
                raise ValueError(f"rank {rank}: no destination for {key}")
            # split tensors are merged by their row maps even at tp=1 (Megatron's qkv interleave, vocab padding)
            mcore = None if rule.dim is None else \
                [shard_index(rule, "mcore", dims, layout.tp, k).to(device) for k in range(layout.tp)]
            vllm = shard_index(rule, "vllm", dims, gen_tp, gen.tp_for(rule.kind)).to(device)
            self.steps.append((key, rule, stage, mcore, vllm))

    @torch.no_grad()
    def run(self) -> BaselineStats:
        start = time.perf_counter()
        meter, recv, calls = _Meter(), 0, 0
        for key, rule, stage, mcore_maps, vllm_map in self.steps:
            dim, full, held = rule.index_dim, None, stage == self.stage
            if held and mcore_maps is None:
                full = self.sources[key]  # replicated: already whole, no temporary
            elif held:
                shard = self.sources[key]
                gathered = [shard]
                if len(mcore_maps) > 1:
                    gathered = [torch.empty_like(shard) for _ in mcore_maps]
                    meter.alloc(*gathered)
                    dist.all_gather(gathered, shard, group=self.tp_group)
                    calls += 1
                    recv += (len(gathered) - 1) * shard.numel() * shard.element_size()
                full = shard.new_empty(canonical_shape(rule, self.dims))
                meter.alloc(full)
                for part, rows in zip(gathered, mcore_maps):
                    put_shard(full, part, rows, dim)
                if len(mcore_maps) > 1:
                    meter.free(*gathered)
                del gathered
            if self.layout.pp > 1:
                if not held:
                    full = torch.empty(canonical_shape(rule, self.dims), dtype=self.dtype,
                                       device=self.dests[key].device)
                    meter.alloc(full)
                    recv += full.numel() * full.element_size()
                dist.broadcast(full, src=self.pp_ranks[stage], group=self.pp_group)
                calls += 1
            part = take_shard(full, vllm_map, dim)
            meter.alloc(part)
            self.dests[key].copy_(part)
            meter.free(part)
            if full is not self.sources.get(key):
                meter.free(full)
            del full, part
        if any(d.device.type == "cuda" for d in self.dests.values()):
            torch.cuda.synchronize()
        return BaselineStats(recv_bytes=recv, collectives=calls, seconds=time.perf_counter() - start,
                             peak_buffer_bytes=meter.peak)

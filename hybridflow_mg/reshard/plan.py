"""The reshard plan: pure data (no processes) saying, for one rank, what it sends, receives and writes where.

Training shards (Megatron, layout t·p·d, vpp) become generation shards (vLLM per-rank layout, or full
HF tensors) in the layout t_g·p_g; with p_g > 1 a rank's destinations are its vLLM stage's parameters
(`models.layouts.vllm_stage_holds`). HybridFlow §5: each generation shard is assembled inside
the *micro-DP group* of d_g = t·p/t_g ranks that hold its pieces, so a rank receives only what its
generation shard needs and it does not hold: (d_g − 1)/(t·p)·M when t_g | t (the formula is exact for
the TP-split layer weights; stage-only tensors — embedding, output layer, norms — are moved exactly
as needed).

Two kinds of traffic, each bucketed (one collective per bucket, however many tensors):

1. Gather buckets (t_g | t): every micro-DP member's pieces of the per-layer, TP-split weights are
   whole training tensors inside the group's shared generation shard, and members hold the same
   number of equally shaped layers. So the members' streams line up: bucket b is the same run of
   tensor positions on every member, and one `all_gather_into_tensor` in the micro-DP group delivers
   it, with no padding and nothing a receiver already has.
2. Exchange buckets: everything else (vocab-parallel embedding / output rows, norms of other stages,
   the final norm, the value head; all tensors when t_g > t) goes by `all_to_all_single` inside the
   training replica with exact per-peer splits: each needed row from one holder, own rows by a
   local self-send. When t_g > t a rank's per-layer destination is the TP slice inside its own
   training slice (`GenCoord.weight_tp`), so it self-sends its stage's layers and receives the
   minimum, (p − 1)/(t_g·p) of the layer weights (`ParallelLayout.min_recv_fraction`).

Every write into a destination comes from a received buffer through a 2-D block-copy map
(`reshard.kernels.CopyProgram`: one launch per bucket).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from hybridflow_mg.parallel.layout import ParallelLayout
from hybridflow_mg.models.layouts import (ModelDims, ParamRule, check_gen_pp, hf_names, layer_location, name,
                                          rules_for, vllm_stage_holds)
from hybridflow_mg.models.rowmaps import index_to_runs, locate, shard_index, shard_shape

FORMATS = ("vllm", "hf")


@dataclass(frozen=True)
class TensorRef:
    """One tensor of a rank: a training shard or a destination. `index` = the canonical rows (along
    the rule's split dim) that its rows hold, −1 for padding rows."""

    rule: ParamRule
    layer: int | None
    index: torch.Tensor = field(repr=False, compare=False)
    shape: tuple[int, ...]
    name: str

    @property
    def key(self) -> tuple[str, int | None]:
        return (self.rule.key, self.layer)

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


def _stage_layers(dims: ModelDims, layout: ParallelLayout, pp_rank: int) -> list[int]:
    return [layer for layer in range(dims.num_layers)
            if layer_location(layer, dims.num_layers, layout.pp, layout.vpp)[0] == pp_rank]


def training_tensors(dims: ModelDims, layout: ParallelLayout, rank: int) -> list[TensorRef]:
    """`rank`'s training shards, per-layer tensors first (global layer order, rule order), then the rest."""
    c = layout.train_coord(rank)
    layers = _stage_layers(dims, layout, c.pp)
    out = []
    for layer in layers:
        for rule in rules_for(dims):
            if rule.per_layer:
                out.append(_train_ref(rule, layer, dims, layout.tp, c.tp))
    for rule in rules_for(dims):
        if not rule.per_layer and ((rule.key == "embedding") == (c.pp == 0) if rule.key == "embedding"
                                   else c.pp == layout.pp - 1):
            out.append(_train_ref(rule, None, dims, layout.tp, c.tp))
    return out


def _train_ref(rule, layer, dims, tp, tp_rank) -> TensorRef:
    return TensorRef(rule, layer, shard_index(rule, "mcore", dims, tp, tp_rank),
                     shard_shape(rule, "mcore", dims, tp), name(rule, "mcore", layer))


def destination_tensors(dims: ModelDims, layout: ParallelLayout, rank: int, fmt: str = "vllm") -> list[TensorRef]:
    """`rank`'s generation tensors: vLLM's per-rank parameters (those of its pipeline stage), or every HF
    tensor (needs gen tp = pp = 1)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown reshard destination {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "hf" and (layout.gen_tp != 1 or layout.gen_pp != 1):
        raise ValueError("an HF destination holds whole tensors: plan it with generation tp=1, pp=1")
    g = layout.gen_coord(rank)
    out = []
    for rule in rules_for(dims):
        for layer in (range(dims.num_layers) if rule.per_layer else [None]):
            if fmt == "vllm" and not vllm_stage_holds(rule, layer, dims, layout.gen_pp, g.pp):
                continue
            if fmt == "vllm":
                out.append(TensorRef(rule, layer, shard_index(rule, "vllm", dims, layout.gen_tp, g.tp_for(rule.kind)),
                                     shard_shape(rule, "vllm", dims, layout.gen_tp), name(rule, "vllm", layer)))
                continue
            start = 0  # HF: one destination per source tensor (q, k, v separately; gate, up separately)
            for hf_name, part in zip(hf_names(rule, layer), rule.parts):
                rows = dims.extent(part) if rule.index_dim == 0 else dims.extent(rule.trailing[0])
                shape = (dims.extent(part), *(dims.extent(t) for t in rule.trailing))
                out.append(TensorRef(rule, layer, torch.arange(start, start + rows), shape, hf_name))
                start += rows
    return out


def _row_elems(ref: TensorRef) -> int:
    """Elements per index row: a row (dim 0) or, for column splits, one element per matrix row."""
    return int(torch.Size(ref.shape[1:]).numel()) if ref.rule.index_dim == 0 else 1


def _block_copies(src: TensorRef, src_offset: int, dst: TensorRef, dst_index: int, pos: torch.Tensor) -> list[list[int]]:
    """Copy-map rows writing into `dst` the rows `pos` says `src` (packed at `src_offset`) supplies.

    `pos[i]` = row of src holding dst row i, or −1. Dim-0 runs are contiguous element ranges;
    dim-1 (row-parallel) runs are [out, len] column blocks with each tensor's own row stride.
    """
    copies = []
    if src.rule.index_dim == 0:
        row = _row_elems(src)
        for d, s, n in index_to_runs(pos):
            copies.append([src_offset + s * row, row, dst_index, d * row, row, 1, n * row])
    else:
        rows, src_cols, dst_cols = src.shape[0], src.shape[1], dst.shape[1]
        for d, s, n in index_to_runs(pos):
            copies.append([src_offset + s, src_cols, dst_index, d, dst_cols, rows, n])
    return copies


@dataclass
class Piece:
    """Rows `rows` (along the split dim) of one training tensor of the sender, packed contiguously as
    `tensor.index_select(dim, rows)` (a dim-1 piece is one [out, len(rows)] matrix)."""

    tensor: int
    """Position in the sender's `training_tensors` list."""
    rows: torch.Tensor = field(repr=False)
    numel: int


@dataclass
class GatherBucket:
    tensors: list[int]
    """Positions in each member's training list; the same positions on every member of the group."""
    elems_per_member: int
    copies: torch.Tensor = field(repr=False)
    """[N, 7] block copies from the gathered buffer (members in group order) into destinations."""


@dataclass
class ExchangeBucket:
    send: list[list[Piece]]
    """Per peer of the replica group (group order): the pieces this rank sends it (itself included)."""
    send_splits: list[int]
    recv_splits: list[int]
    copies: torch.Tensor = field(repr=False)
    """[N, 7] block copies from the receive buffer (senders in group order) into destinations."""


@dataclass
class RankPlan:
    """Everything one rank needs to reshard, and the bytes it will receive."""

    rank: int
    layout: ParallelLayout
    dims: ModelDims
    element_size: int
    train: list[TensorRef]
    dests: list[TensorRef]
    micro_group: list[int]
    replica_group: list[int]
    gathers: list[GatherBucket]
    exchanges: list[ExchangeBucket]

    @property
    def num_collectives(self) -> int:
        return len(self.gathers) + len(self.exchanges)

    @cached_property
    def recv_elems(self) -> int:
        """Elements received from other ranks (own contributions and self-sends excluded)."""
        me = self.replica_group.index(self.rank)
        gathered = sum(b.elems_per_member * (len(self.micro_group) - 1) for b in self.gathers)
        exchanged = sum(sum(e.recv_splits) - e.recv_splits[me] for e in self.exchanges)
        return gathered + exchanged

    @property
    def recv_bytes(self) -> int:
        return self.recv_elems * self.element_size

    @property
    def peak_buffer_bytes(self) -> int:
        """Largest transient buffer set of one bucket (the resharder's extra memory)."""
        sizes = [b.elems_per_member * len(self.micro_group) for b in self.gathers]
        sizes += [sum(e.send_splits) + sum(e.recv_splits) for e in self.exchanges]
        return max(sizes, default=0) * self.element_size

    def gathered_bytes(self) -> int:
        """Bytes received through gather buckets: the per-layer TP-split weights, which are exactly
        (d_g − 1)/(t·p) of their total when t_g | t."""
        return sum(b.elems_per_member * (len(self.micro_group) - 1) for b in self.gathers) * self.element_size


def _symmetric(dims: ModelDims, layout: ParallelLayout) -> bool:
    return layout.tp % layout.gen_tp == 0 and layout.gen_pp == 1 and layout.micro_dp > 1


def plan_reshard(dims: ModelDims, layout: ParallelLayout, rank: int, *, fmt: str = "vllm", element_size: int = 2,
                 bucket_bytes: int = 256 << 20) -> RankPlan:
    """The plan of `rank`. Pure and deterministic: every rank derives the same global picture."""
    check_gen_pp(dims.num_layers, layout.gen_pp)
    replica = next(g for g in layout.model_parallel_groups if rank in g)
    micro = next(g for g in layout.micro_dp_groups if rank in g)
    train = {m: training_tensors(dims, layout, m) for m in replica}
    dests = {m: destination_tensors(dims, layout, m, fmt) for m in replica}
    bucket_elems = max(1, bucket_bytes // element_size)

    # --- 1. gather buckets over the symmetric per-layer split weights ------------------------------
    covered = {m: [torch.zeros(len(d.index), dtype=torch.bool) for d in dests[m]] for m in replica}
    gathers: list[GatherBucket] = []
    if _symmetric(dims, layout):
        positions = [i for i, t in enumerate(train[rank]) if t.rule.per_layer and t.rule.dim is not None]
        buckets, size = [[]], 0
        for i in positions:
            n = train[rank][i].numel
            if buckets[-1] and size + n > bucket_elems:
                buckets.append([])
                size = 0
            buckets[-1].append(i)
            size += n
        for group in layout.micro_dp_groups:  # mark coverage on every replica member (for the exchange)
            if group[0] not in replica:
                continue
            for m in group:
                _cover_gathered(positions, group, train, dests[m], covered[m])
        for bucket in buckets:
            if bucket:
                gathers.append(_gather_bucket(bucket, micro, train, dests[rank]))

    # --- 2. exchange buckets for what is still missing ---------------------------------------------
    exchanges = _exchange_buckets(rank, layout, replica, micro, train, dests, covered, bucket_elems)
    return RankPlan(rank=rank, layout=layout, dims=dims, element_size=element_size, train=train[rank],
                    dests=dests[rank], micro_group=micro, replica_group=replica, gathers=gathers,
                    exchanges=exchanges)


def _dest_by_key(dests: list[TensorRef]) -> dict:
    out: dict = {}
    for i, d in enumerate(dests):
        out.setdefault(d.key, []).append(i)
    return out


def _cover_gathered(positions, group, train, dests, covered) -> None:
    by_key = _dest_by_key(dests)
    for m in group:
        for i in positions:
            src = train[m][i]
            for j in by_key.get(src.key, []):
                covered[j] |= locate(dests[j].index, src.index) >= 0


def _gather_bucket(bucket: list[int], micro: list[int], train, dests) -> GatherBucket:
    elems = sum(train[micro[0]][i].numel for i in bucket)
    by_key = _dest_by_key(dests)
    copies: list[list[int]] = []
    for slot, m in enumerate(micro):
        offset = slot * elems
        for i in bucket:
            src = train[m][i]
            used = 0
            for j in by_key.get(src.key, []):
                pos = locate(dests[j].index, src.index)
                copies += _block_copies(src, offset, dests[j], j, pos)
                used += int((pos >= 0).sum())
            if used < int((src.index >= 0).sum()):  # HybridFlow's premise: nothing sent is unused
                raise RuntimeError(f"{src.name} of rank {m} is not inside its generation shard; cannot gather it")
            offset += src.numel
    return GatherBucket(bucket, elems, torch.tensor(copies, dtype=torch.long).reshape(-1, 7))


def _exchange_buckets(rank, layout, replica, micro, train, dests, covered, bucket_elems) -> list[ExchangeBucket]:
    """Assign every still-missing destination row to one holder, then cut the transfers into rounds."""
    # transfers[(receiver, dest j)] = list of (sender, train i, pos) in destination order
    transfers = []  # (dest order key, receiver, j, sender, i, pos)
    for r in replica:
        r_micro = next(g for g in layout.micro_dp_groups if r in g)
        holders = [r] + [m for m in r_micro if m != r] + [m for m in replica if m not in r_micro]
        train_by_key = {m: {} for m in replica}
        for m in replica:
            for i, t in enumerate(train[m]):
                train_by_key[m].setdefault(t.key, []).append(i)
        for j, dst in enumerate(dests[r]):
            missing = (dst.index >= 0) & ~covered[r][j]
            if not missing.any():
                continue
            want = torch.where(missing, dst.index, -1)
            for h in holders:
                for i in train_by_key[h].get(dst.key, []):
                    pos = locate(want, train[h][i].index)
                    if (pos >= 0).any():
                        transfers.append((j, r, j, h, i, pos))
                        want = torch.where(pos >= 0, -1, want)
                if not (want >= 0).any():
                    break
            if (want >= 0).any():
                raise RuntimeError(f"no rank of replica {replica} holds rows of {dst.name} that rank {r} needs")
    # rounds: cut by destination tensor order so that every rank agrees on the boundaries
    rounds, size, current_key = [[]], 0, None
    for t in sorted(transfers, key=lambda t: (t[0], t[1])):
        n = int((t[5] >= 0).sum()) * _row_elems(train[t[3]][t[4]])
        if rounds[-1] and size + n > bucket_elems * len(replica) and t[0] != current_key:
            rounds.append([])
            size = 0
        rounds[-1].append(t)
        size += n
        current_key = t[0]
    return [_exchange_bucket(rank, replica, train, dests, chunk) for chunk in rounds if chunk]


def _exchange_bucket(rank, replica, train, dests, transfers) -> ExchangeBucket:
    send: list[list[Piece]] = [[] for _ in replica]
    recv_layout: list[list[tuple]] = [[] for _ in replica]  # per sender: (piece numel, dest j, pos, src ref)
    for _, r, j, h, i, pos in transfers:
        src = train[h][i]
        rows = pos[pos >= 0]  # the sender's rows in destination order
        numel = len(rows) * (_row_elems(src) if src.rule.index_dim == 0 else src.shape[0])
        if h == rank:
            send[replica.index(r)].append(Piece(i, rows, numel))
        if r == rank:
            recv_layout[replica.index(h)].append((numel, j, pos, src))
    send_splits = [sum(p.numel for p in pieces) for pieces in send]
    recv_splits = [sum(x[0] for x in per) for per in recv_layout]
    copies: list[list[int]] = []
    offset = 0
    for per_sender in recv_layout:
        for numel, j, pos, src in per_sender:
            dst = dests[rank][j]
            packed = _packed_ref(src, len(pos[pos >= 0]))
            # rows of the packed piece are in destination order: packed row k ↔ the k-th valid dest row
            packed_pos = torch.full_like(pos, -1)
            packed_pos[pos >= 0] = torch.arange(int((pos >= 0).sum()))
            copies += _block_copies(packed, offset, dst, j, packed_pos)
            offset += numel
    return ExchangeBucket(send, send_splits, recv_splits, torch.tensor(copies, dtype=torch.long).reshape(-1, 7))


def _packed_ref(src: TensorRef, num_rows: int) -> TensorRef:
    """The shape a piece of `src` has once packed: `num_rows` rows (or columns) of it."""
    shape = list(src.shape)
    shape[src.rule.index_dim] = num_rows
    return TensorRef(src.rule, src.layer, torch.arange(num_rows), tuple(shape), src.name)

"""Row maps: the mechanics half of the resharder. Everything is index_select / scatter with them.

A row map of a shard is a LongTensor with one entry per row of that shard along the rule's split
dim (`ParamRule.index_dim`): the row of the canonical tensor it holds, or ``-1`` for a padding row
(vocab padding; never a real token). Moving any shard to any other — Megatron tp=t to vLLM t_g,
Megatron tp=4 to tp=2, HF import, export — is "find where each destination row lives and copy it".
`index_to_runs` compresses a map into contiguous copies for a bucketed copy kernel.

Row maps in terms of heads (``H`` query heads, ``K`` KV heads, ``d`` = head_dim; the canonical qkv
tensor is H query heads, then K key heads, then K value heads, ``d`` rows each):

- Megatron ``linear_qkv``: for each KV group g: ``[q heads g·H/K .. (g+1)·H/K − 1; k_g; v_g]``;
  rank r holds groups ``r·K/t .. (r+1)·K/t − 1``. Consecutive ranks of tp=2t concatenate to a rank of
  tp=t.
- vLLM ``qkv_proj``: rank j holds ``[q heads of j; k heads of j; v heads of j]``; when t_g ≥ K each
  rank holds one KV head, ``j // (t_g / K)`` (replicated across t_g / K ranks).
- ``linear_fc1`` / ``gate_up_proj``: rank r holds ``[gate_r; up_r]`` in both formats, so Megatron
  ranks do not concatenate to a coarser Megatron shard (``[g0; u0; g1; u1] ≠ [g0; g1; u0; u1]``):
  merge with `copy_rows`, which follows the maps.
- Vocab: each format's padded vocab split evenly in rank order; rows ≥ vocab_size are ``-1``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from hybridflow_mg.models.layouts import ModelDims, ParamRule, canonical_shape, check_split


def _range(start: int, stop: int) -> torch.Tensor:
    return torch.arange(start, stop, dtype=torch.long)


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Canonical rows of a list of canonical heads, ``head_dim`` rows each, in order."""
    return (heads[:, None] * head_dim + _range(0, head_dim)[None, :]).reshape(-1)


def _qkv_heads(dims: ModelDims, fmt: str, tp: int, rank: int) -> torch.Tensor:
    """Canonical head ids (q: 0..H−1, k: H..H+K−1, v: H+K..H+2K−1) of one rank's qkv rows."""
    H, K = dims.num_heads, dims.num_kv_heads
    if fmt == "mcore":
        groups = _range(rank * K // tp, (rank + 1) * K // tp)  # [groups of rank]
        q = groups[:, None] * dims.heads_per_group + _range(0, dims.heads_per_group)[None, :]
        return torch.cat([q, H + groups[:, None], H + K + groups[:, None]], dim=1).reshape(-1)
    q = _range(rank * H // tp, (rank + 1) * H // tp)
    if tp >= K:  # QKVParallelLinear.num_kv_head_replicas = tp / K
        kv = torch.tensor([rank // (tp // K)], dtype=torch.long)
    else:
        kv = _range(rank * K // tp, (rank + 1) * K // tp)
    return torch.cat([q, H + kv, H + K + kv])


def shard_index(rule: ParamRule, fmt: str, dims: ModelDims, num_shards: int, shard: int) -> torch.Tensor:
    """Row map of rank ``shard`` of ``num_shards`` in ``fmt`` (``"mcore"`` or ``"vllm"``).

    Replicated rules (``dim=None``) return the identity over dim 0: every rank holds everything.
    """
    check_split(dims, fmt, num_shards)
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} outside 0..{num_shards - 1}")
    shape = canonical_shape(rule, dims)
    if rule.dim is None:
        return _range(0, shape[0])
    if rule.kind == "qkv":
        return _head_rows(_qkv_heads(dims, fmt, num_shards, shard), dims.head_dim)
    if rule.kind == "gate_up":
        ffn, per = dims.ffn_hidden_size, dims.ffn_hidden_size // num_shards
        rows = _range(shard * per, (shard + 1) * per)
        return torch.cat([rows, ffn + rows])
    if rule.kind == "vocab":
        per = dims.padded_vocab(fmt, num_shards) // num_shards
        rows = _range(shard * per, (shard + 1) * per)
        return torch.where(rows < dims.vocab_size, rows, -1)
    per = shape[rule.dim] // num_shards
    return _range(shard * per, (shard + 1) * per)


def shard_shape(rule: ParamRule, fmt: str, dims: ModelDims, num_shards: int) -> tuple[int, ...]:
    """Shape of every rank's shard (all ranks of a format have the same shape)."""
    shape = list(canonical_shape(rule, dims))
    shape[rule.index_dim] = len(shard_index(rule, fmt, dims, num_shards, 0))
    return tuple(shape)


# --- HF <-> canonical ------------------------------------------------------------------------------
def to_canonical(rule: ParamRule, hf_tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate the HF sources (in ``rule.hf`` order) along dim 0."""
    if len(hf_tensors) != len(rule.hf):
        raise ValueError(f"rule {rule.key} takes {len(rule.hf)} HF tensors, got {len(hf_tensors)}")
    return hf_tensors[0] if len(hf_tensors) == 1 else torch.cat(list(hf_tensors), dim=0)


def from_canonical(rule: ParamRule, canonical: torch.Tensor, dims: ModelDims) -> list[torch.Tensor]:
    """Split back into the HF sources (views). Rows past ``vocab_size`` (padding) are dropped."""
    sizes = [dims.extent(p) for p in rule.parts]
    if rule.kind == "vocab":
        canonical = canonical[: dims.vocab_size]
    if canonical.shape[0] != sum(sizes):
        raise ValueError(f"rule {rule.key}: canonical has {canonical.shape[0]} rows, expected {sum(sizes)}")
    return list(canonical.split(sizes, dim=0))


# --- moving rows -----------------------------------------------------------------------------------
def take_shard(canonical: torch.Tensor, index: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """The shard with row map ``index``: rows of ``canonical`` along ``dim``, zeros for ``-1``."""
    pad = index < 0
    out = canonical.index_select(dim, index.clamp(min=0))
    if pad.any():
        out.index_fill_(dim, pad.nonzero().squeeze(1), 0)
    return out


def put_shard(dest: torch.Tensor, shard: torch.Tensor, index: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Scatter ``shard`` into the canonical ``dest`` along ``dim``, skipping padding; returns dest."""
    keep = (index >= 0).nonzero().squeeze(1)
    dest.index_copy_(dim, index[keep], shard.index_select(dim, keep))
    return dest


def locate(dest_index: torch.Tensor, src_index: torch.Tensor) -> torch.Tensor:
    """For each row of a destination shard, the row of a source shard holding the same canonical
    row, or ``-1`` where the source lacks it (or the destination row is padding)."""
    size = int(max(dest_index.max(), src_index.max(), 0)) + 1
    where = torch.full((size,), -1, dtype=torch.long)
    held = (src_index >= 0).nonzero().squeeze(1)
    where[src_index[held]] = held
    return torch.where(dest_index >= 0, where[dest_index.clamp(min=0)], -1)


def copy_rows(dest: torch.Tensor, dest_index: torch.Tensor, src: torch.Tensor, src_index: torch.Tensor,
              dim: int = 0) -> int:
    """Copy into shard ``dest`` every row that shard ``src`` holds; returns the rows copied.

    Any shard to any shard, any formats: e.g. merging Megatron fc1 shards of tp=2 into tp=1.
    """
    pos = locate(dest_index, src_index)
    rows = (pos >= 0).nonzero().squeeze(1)
    dest.index_copy_(dim, rows, src.index_select(dim, pos[rows]))
    return len(rows)


def index_to_runs(index: torch.Tensor) -> list[tuple[int, int, int]]:
    """Compress a row map into ``(dst_start, src_start, length)`` runs of consecutive rows.

    ``dst`` is the shard row, ``src`` the canonical row; padding rows belong to no run. A qkv shard
    has one run per head block, everything else a handful.
    """
    valid = index >= 0
    cont = torch.zeros_like(valid)  # row i continues the run of row i-1
    cont[1:] = valid[1:] & valid[:-1] & (index[1:] == index[:-1] + 1)
    starts = (valid & ~cont).nonzero().squeeze(1)
    ends = (valid & ~torch.cat([cont[1:], cont.new_zeros(1)])).nonzero().squeeze(1)
    return [(s, int(index[s]), e - s + 1) for s, e in zip(starts.tolist(), ends.tolist())]

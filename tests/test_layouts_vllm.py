"""vLLM per-rank shards against a direct construction from the HF tensors, and Megatron -> vLLM.

The direct construction below restates vLLM's loaders plainly (QKVParallelLinear with
num_kv_head_replicas, MergedColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding padded
to 64 then split); it shares no code with the row maps.
"""
import pytest
import torch

from hybridflow_mg.models.layouts import ModelDims, hf_names, hf_shapes, rules_for
from hybridflow_mg.models.rowmaps import (
    copy_rows, from_canonical, put_shard, shard_index, shard_shape, take_shard, to_canonical,
)


def make_dims(kv, **kw):
    return ModelDims(num_layers=2, hidden_size=64, num_heads=8, num_kv_heads=kv, head_dim=8,
                     ffn_hidden_size=96, vocab_size=100, qkv_bias=True, **kw)


def hf_params(dims, seed=1):
    """One random HF tensor list per (rule, layer) — layer 1 for per-layer rules."""
    gen = torch.Generator().manual_seed(seed)
    for rule in rules_for(dims):
        names = hf_names(rule, 1 if rule.per_layer else None)
        yield rule, names, [torch.randn(s, generator=gen) for s in hf_shapes(rule, dims)]


def vllm_direct(rule, dims, sources, tp, rank):
    d, K = dims.head_dim, dims.num_kv_heads
    if rule.kind == "qkv":
        q, k, v = sources
        q_rank = q.chunk(tp)[rank]
        if tp >= K:  # one kv head per rank, each replicated on tp // K consecutive ranks
            head = rank // (tp // K)
            k_rank, v_rank = k[head * d:(head + 1) * d], v[head * d:(head + 1) * d]
        else:
            k_rank, v_rank = k.chunk(tp)[rank], v.chunk(tp)[rank]
        return torch.cat([q_rank, k_rank, v_rank])
    if rule.kind == "gate_up":
        gate, up = sources
        return torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]])
    if rule.kind == "vocab":
        padded = (dims.vocab_size + 63) // 64 * 64
        table = torch.cat([sources[0], sources[0].new_zeros(padded - dims.vocab_size, dims.hidden_size)])
        return table.chunk(tp)[rank]
    if rule.dim is None:
        return sources[0]
    return sources[0].chunk(tp, dim=rule.dim)[rank]


@pytest.mark.parametrize("kv", [4, 2, 1])
def test_vllm_shards_match_direct_construction_and_round_trip(kv):
    dims = make_dims(kv)
    for rule, names, sources in hf_params(dims):
        canonical = to_canonical(rule, sources)
        for tp in (1, 2, 4, 8):
            rebuilt = torch.full_like(canonical, float("nan"))
            for rank in range(tp):
                index = shard_index(rule, "vllm", dims, tp, rank)
                shard = take_shard(canonical, index, rule.index_dim)
                assert shard.shape == shard_shape(rule, "vllm", dims, tp)
                assert torch.equal(shard, vllm_direct(rule, dims, sources, tp, rank)), (rule.key, tp, rank)
                put_shard(rebuilt, shard, index, rule.index_dim)  # replicated kv rows are written twice, equal
            for back, source in zip(from_canonical(rule, rebuilt, dims), sources):
                assert torch.equal(back, source), (rule.key, tp)


def test_vllm_kv_replication_and_vocab_padding_in_the_maps():
    dims = make_dims(2)
    qkv = next(r for r in rules_for(dims) if r.key == "qkv")
    # tp=8, 2 kv heads: ranks 0-3 hold kv head 0, ranks 4-7 kv head 1; q head = rank
    for rank in range(8):
        rows = shard_index(qkv, "vllm", dims, 8, rank).tolist()
        kv_head = rank // 4
        assert rows == (list(range(8 * rank, 8 * rank + 8)) + list(range(64 + 8 * kv_head, 72 + 8 * kv_head))
                        + list(range(80 + 8 * kv_head, 88 + 8 * kv_head)))
    emb = next(r for r in rules_for(dims) if r.key == "embedding")
    assert shard_index(emb, "vllm", dims, 4, 3).tolist() == list(range(96, 100)) + [-1] * 28
    assert (shard_index(emb, "vllm", dims, 1, 0)[100:] == -1).all()


@pytest.mark.parametrize("kv", [4, 2])
def test_megatron_to_vllm_by_row_maps(kv):
    """The resharder in miniature: fill every vLLM rank from the Megatron shards that hold its rows."""
    dims = make_dims(kv, vocab_divisor=8)
    for rule, names, sources in hf_params(dims):
        canonical, dim = to_canonical(rule, sources), rule.index_dim
        for t in (t for t in (1, 2, 4) if kv % t == 0):
            mcore = [(m, take_shard(canonical, m, dim)) for m in (shard_index(rule, "mcore", dims, t, r) for r in range(t))]
            for tg in (1, 2, 4, 8):
                for rank in range(tg):
                    dest_index = shard_index(rule, "vllm", dims, tg, rank)
                    dest = torch.zeros(shard_shape(rule, "vllm", dims, tg))
                    copied = sum(copy_rows(dest, dest_index, s, m, dim) for m, s in mcore)
                    if rule.dim is None:
                        assert copied == t * len(dest_index)  # every Megatron rank holds it all
                    else:
                        assert copied == int((dest_index >= 0).sum())  # each real row from exactly one rank
                    assert torch.equal(dest, vllm_direct(rule, dims, sources, tg, rank)), (rule.key, t, tg, rank)

"""Round trips per rule through megatron-core shards, checked against plainly written layouts."""
import pytest
import torch

from hybridflow_mg.models.layouts import (
    RULES_BY_KEY, ModelDims, check_pp, global_layer, hf_names, hf_shapes, layer_location, match,
    mcore_padded_vocab, name, rules_for, vllm_padded_vocab,
)
from hybridflow_mg.models.rowmaps import (
    copy_rows, from_canonical, index_to_runs, put_shard, shard_index, shard_shape, take_shard,
    to_canonical,
)


def make_dims(kv=4, **kw):
    base = dict(num_layers=2, hidden_size=64, num_heads=8, num_kv_heads=kv, head_dim=8,
                ffn_hidden_size=96, vocab_size=100, qkv_bias=True)
    return ModelDims(**{**base, **kw})


def make_hf(dims, seed=0):
    """A random HF state dict with every tensor of every rule (names from the HF templates)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for rule in rules_for(dims):
        for layer in (range(dims.num_layers) if rule.per_layer else [None]):
            for n, shape in zip(hf_names(rule, layer), hf_shapes(rule, dims)):
                state[n] = torch.randn(shape, generator=gen)
    return state


def instances(dims, hf):
    """(rule, HF names, canonical) for every parameter of the model."""
    for rule in rules_for(dims):
        for layer in (range(dims.num_layers) if rule.per_layer else [None]):
            names = hf_names(rule, layer)
            yield rule, names, to_canonical(rule, [hf[n] for n in names])


def mcore_direct(rule, dims, sources, tp, rank):
    """Megatron's shard built by hand from the HF tensors, without row maps."""
    K, d = dims.num_kv_heads, dims.head_dim
    if rule.kind == "qkv":  # per group: its q heads, its k head, its v head; tp=1 layout chunked
        q, k, v = (s.reshape(K, -1, *s.shape[1:]) for s in sources)
        full = torch.cat([q, k, v], dim=1).reshape(-1, *sources[0].shape[1:])
        return full.chunk(tp)[rank]
    if rule.kind == "gate_up":
        gate, up = sources
        return torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]])
    if rule.kind == "vocab":
        multiple = dims.vocab_divisor * tp
        padded = (dims.vocab_size + multiple - 1) // multiple * multiple
        table = torch.cat([sources[0], sources[0].new_zeros(padded - dims.vocab_size, dims.hidden_size)])
        return table.chunk(tp)[rank]
    if rule.dim is None:
        return sources[0]
    return sources[0].chunk(tp, dim=rule.dim)[rank]


@pytest.mark.parametrize("kv", [4, 2, 1])
@pytest.mark.parametrize("divisor", [128, 8])
def test_mcore_round_trip_bit_exact(kv, divisor):
    dims = make_dims(kv, vocab_divisor=divisor)
    hf = make_hf(dims)
    for tp in (t for t in (1, 2, 4) if kv % t == 0):
        for rule, names, canonical in instances(dims, hf):
            dim = rule.index_dim
            maps = [shard_index(rule, "mcore", dims, tp, r) for r in range(tp)]
            shards = [take_shard(canonical, m, dim) for m in maps]
            for r, shard in enumerate(shards):
                assert shard.shape == shard_shape(rule, "mcore", dims, tp)
                assert torch.equal(shard, mcore_direct(rule, dims, [hf[n] for n in names], tp, r)), (rule.key, tp, r)
            rebuilt = torch.full_like(canonical, float("nan"))  # a missed row stays NaN and fails equal
            for m, shard in zip(maps, shards):
                put_shard(rebuilt, shard, m, dim)
            for n, back in zip(names, from_canonical(rule, rebuilt, dims)):
                assert torch.equal(back, hf[n]), (rule.key, tp, n)


@pytest.mark.parametrize("kv", [4, 2])
def test_mcore_qkv_shards_concatenate_to_coarser_tp_but_fc1_does_not(kv):
    dims = make_dims(kv)
    hf = make_hf(dims)
    canonical = {rule.key: to_canonical(rule, [hf[n] for n in hf_names(rule, 0 if rule.per_layer else None)])
                 for rule in rules_for(dims)}

    def shards(key, tp):
        rule = RULES_BY_KEY[key]
        return [take_shard(canonical[key], shard_index(rule, "mcore", dims, tp, r), rule.index_dim) for r in range(tp)]

    for coarse in (t for t in (1, 2) if kv % (2 * t) == 0):
        fine = 2 * coarse
        for key in ("qkv", "qkv_bias"):
            for r in range(coarse):
                assert torch.equal(torch.cat(shards(key, fine)[2 * r: 2 * r + 2]), shards(key, coarse)[r])
        fc1_fine, fc1_coarse = shards("fc1", fine), shards("fc1", coarse)
        assert not torch.equal(torch.cat(fc1_fine[:2]), fc1_coarse[0])
        # merging follows the row maps instead: [g0; u0] + [g1; u1] -> [g0; g1; u0; u1]
        rule = RULES_BY_KEY["fc1"]
        for r in range(coarse):
            dest_map = shard_index(rule, "mcore", dims, coarse, r)
            merged = torch.full_like(fc1_coarse[r], float("nan"))
            copied = sum(copy_rows(merged, dest_map, s, shard_index(rule, "mcore", dims, fine, f))
                         for f, s in enumerate(fc1_fine))
            assert copied == len(dest_map) and torch.equal(merged, fc1_coarse[r])


def test_mcore_vocab_merge_across_tp_rewrites_padding():
    """Megatron's padding depends on tp, so vocab shards never concatenate; copy_rows still merges."""
    dims = make_dims(vocab_divisor=8)
    rule = RULES_BY_KEY["embedding"]
    table = torch.randn(100, 64)
    maps = [shard_index(rule, "mcore", dims, 4, r) for r in range(4)]
    fine = [(m, take_shard(table, m)) for m in maps]
    for r in range(2):
        dest_map = shard_index(rule, "mcore", dims, 2, r)
        dest = torch.zeros(shard_shape(rule, "mcore", dims, 2))
        for m, s in fine:
            copy_rows(dest, dest_map, s, m)
        assert torch.equal(dest, take_shard(table, dest_map))


def test_qkv_bias_follows_the_qkv_row_map():
    for kv in (4, 2, 1):
        dims = make_dims(kv)
        for fmt, sizes in (("mcore", [t for t in (1, 2, 4) if kv % t == 0]), ("vllm", [1, 2, 4, 8])):
            for tp in sizes:
                for r in range(tp):
                    assert torch.equal(shard_index(RULES_BY_KEY["qkv_bias"], fmt, dims, tp, r),
                                       shard_index(RULES_BY_KEY["qkv"], fmt, dims, tp, r))


def test_vocab_padding_rows_are_minus_one_and_zero_filled():
    assert mcore_padded_vocab(100, 1) == 128 and mcore_padded_vocab(100, 2) == 256
    assert mcore_padded_vocab(100, 4, divisor=8) == 128 and mcore_padded_vocab(128, 4, divisor=8) == 128
    assert vllm_padded_vocab(100) == 128 and vllm_padded_vocab(32000) == 32000 and vllm_padded_vocab(50257) == 50304
    dims = make_dims(vocab_divisor=8)
    index = shard_index(RULES_BY_KEY["output"], "mcore", dims, 4, 3)  # rows 96..127 of 128
    assert index.tolist() == list(range(96, 100)) + [-1] * 28
    shard = take_shard(torch.randn(100, 64) + 5, index)
    assert (shard[4:] == 0).all() and (shard[:4] != 0).all()
    assert (shard_index(RULES_BY_KEY["output"], "mcore", make_dims(), 2, 1) == -1).all()  # 256 rows, 100 real


def test_tied_embeddings_and_value_head_rules():
    tied = [r.key for r in rules_for(make_dims(tie_embeddings=True, qkv_bias=False))]
    assert "output" not in tied and "qkv_bias" not in tied and "value_head" not in tied
    assert "output" in [r.key for r in rules_for(make_dims())]
    critic = {r.key: r for r in rules_for(make_dims(head="value"))}
    assert "output" not in critic
    head = critic["value_head"]
    assert name(head, "hf") == "score.weight" and name(head, "mcore") == "output_layer.weight"
    assert shard_shape(head, "mcore", make_dims(head="value"), 4) == (1, 64)
    assert shard_index(head, "mcore", make_dims(head="value"), 4, 3).tolist() == [0]


def test_names_for_local_and_te_specs_and_match_round_trip():
    rules = rules_for(make_dims())
    norm, mlp_norm, qkv = RULES_BY_KEY["input_norm"], RULES_BY_KEY["mlp_norm"], RULES_BY_KEY["qkv"]
    assert name(norm, "mcore", 3) == "decoder.layers.3.input_layernorm.weight"
    assert name(norm, "mcore", 3, spec="te") == "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight"
    assert name(mlp_norm, "mcore", 0) == "decoder.layers.0.pre_mlp_layernorm.weight"
    assert name(mlp_norm, "mcore", 0, spec="te") == "decoder.layers.0.mlp.linear_fc1.layer_norm_weight"
    assert name(qkv, "mcore", 1, spec="te") == name(qkv, "mcore", 1) == "decoder.layers.1.self_attention.linear_qkv.weight"
    assert name(qkv, "vllm", 1) == "model.layers.1.self_attn.qkv_proj.weight"
    assert hf_names(qkv, 1)[2] == "model.layers.1.self_attn.v_proj.weight"
    assert name(RULES_BY_KEY["fc1"], "vllm", 0) == "model.layers.0.mlp.gate_up_proj.weight"
    with pytest.raises(ValueError, match="hf_names"):
        name(qkv, "hf", 0)
    with pytest.raises(ValueError, match="per layer"):
        name(qkv, "mcore")
    for rule in rules:
        for layer in ([0, 17] if rule.per_layer else [None]):
            for part, n in enumerate(hf_names(rule, layer)):
                assert match(rules, "hf", n) == (rule, layer, part)
            for fmt, spec in (("mcore", "local"), ("mcore", "te"), ("vllm", "local")):
                assert match(rules, fmt, name(rule, fmt, layer, spec), spec) == (rule, layer, 0)
    assert match(rules, "mcore", "decoder.layers.0.self_attention.linear_qkv._extra_state") is None


def test_index_to_runs_reproduces_every_index():
    assert index_to_runs(torch.tensor([5, 6, 7, -1, -1, 0, 1, 3, 4, -1])) == [(0, 5, 3), (5, 0, 2), (7, 3, 2)]
    for kv in (4, 2, 1):
        dims = make_dims(kv, vocab_divisor=8)
        for fmt, sizes in (("mcore", [t for t in (1, 2, 4) if kv % t == 0]), ("vllm", [1, 2, 4, 8])):
            for rule in rules_for(dims):
                for tp in sizes:
                    for r in range(tp):
                        index = shard_index(rule, fmt, dims, tp, r)
                        runs = index_to_runs(index)
                        rebuilt = torch.full_like(index, -1)
                        for dst, src, length in runs:
                            rebuilt[dst: dst + length] = torch.arange(src, src + length)
                        assert torch.equal(rebuilt, index)
                        for (d0, s0, n0), (d1, s1, _) in zip(runs, runs[1:]):  # maximal runs
                            assert not (d1 == d0 + n0 and s1 == s0 + n0)
    qkv_runs = index_to_runs(shard_index(RULES_BY_KEY["qkv"], "mcore", make_dims(2), 1, 0))
    assert len(qkv_runs) == 6  # per group: q block, k head, v head


def test_pipeline_layer_numbering_follows_megatron():
    # megatron-core get_transformer_layer_offset, even split: chunk c of stage r starts at (c·pp + r)·L/(pp·vpp)
    assert [global_layer(r, i, 8, pp=2, vpp=2, vpp_chunk=c) for c in (0, 1) for r in (0, 1) for i in (0, 1)] == list(range(8))
    assert [global_layer(0, i, 8, pp=2, vpp=2, vpp_chunk=1) for i in (0, 1)] == [4, 5]
    assert [global_layer(r, 0, 8, pp=4) for r in range(4)] == [0, 2, 4, 6]
    for layers, pp, vpp in ((8, 2, 2), (12, 2, 3), (6, 3, 1), (4, 1, 1)):
        seen = []
        for r in range(pp):
            for c in range(vpp):
                for i in range(layers // (pp * vpp)):
                    g = global_layer(r, i, layers, pp, vpp, c)
                    assert g == c * (layers // vpp) + r * (layers // pp // vpp) + i
                    assert layer_location(g, layers, pp, vpp) == (r, c, i)
                    seen.append(g)
        assert sorted(seen) == list(range(layers))


@pytest.mark.parametrize("dims_kw, fmt, tp, message", [
    (dict(num_heads=8, kv=4), "mcore", 3, "num_heads=8 is not divisible by tp=3"),
    (dict(kv=2), "mcore", 4, "num_kv_heads=2 is not divisible by megatron tp=4"),
    (dict(num_heads=12, kv=3), "vllm", 2, "one must divide the other"),
    (dict(ffn_hidden_size=90), "mcore", 4, "ffn_hidden_size=90 is not divisible by tp=4"),
    (dict(num_heads=12, kv=12, ffn_hidden_size=96), "vllm", 3, "padded vocab 128"),
])
def test_bad_dims_raise_one_line(dims_kw, fmt, tp, message):
    dims = make_dims(**dims_kw)
    with pytest.raises(ValueError, match=message) as err:
        shard_index(RULES_BY_KEY["qkv"], fmt, dims, tp, 0)
    assert "\n" not in str(err.value)


def test_bad_model_and_pipeline_dims_raise():
    with pytest.raises(ValueError, match="num_layers=6 is not divisible by pp·vpp"):
        check_pp(6, 2, 2)
    with pytest.raises(ValueError, match="not divisible"):
        global_layer(0, 0, 6, pp=4)
    with pytest.raises(ValueError, match="not a multiple of num_kv_heads"):
        make_dims(kv=3)
    with pytest.raises(ValueError, match="head="):
        make_dims(head="policy")

"""8-rank reshard checks: training shards → vLLM per-rank layout (and HF), bit-exact vs the HF model."""
from __future__ import annotations

import os
from fractions import Fraction
from math import prod

import torch

from hybridflow_mg.parallel.grid import Grid
from hybridflow_mg.parallel.layout import ParallelLayout
from hybridflow_mg.models.hf_io import HFSource
from hybridflow_mg.models.hf_spec import spec_from_hf
from hybridflow_mg.models.rowmaps import locate, take_shard, to_canonical
from hybridflow_mg.reshard.execute import Resharder
from hybridflow_mg.reshard.plan import plan_reshard
from tests.multirank import rank_check
from tests.tiny import llama_config, on_rank0_then_barrier, save_random_hf, shared_tmpdir

_MODEL = {}


def _model():
    """One random HF model for all checks: GQA, untied, vocab not a multiple of 64·t, 4 layers."""
    if not _MODEL:
        root = shared_tmpdir()
        config = llama_config(num_hidden_layers=4, hidden_size=128, num_attention_heads=16, num_key_value_heads=8,
                              vocab_size=250)
        on_rank0_then_barrier(save_random_hf, config, os.path.join(root, "hf"))
        _MODEL.update(dir=os.path.join(root, "hf"), spec=spec_from_hf(config))
    return _MODEL["dir"], _MODEL["spec"]


def _reshard(tp, pp, gen_tp, vpp=1, fmt="vllm", bucket_bytes=20_000, gen_pp=1):
    hf_dir, spec = _model()
    layout = ParallelLayout(world=8, tp=tp, pp=pp, vpp=vpp, gen_tp=gen_tp, gen_pp=gen_pp)
    grid = Grid.create(layout)
    try:
        source = HFSource(hf_dir, spec.dims)
        plan = plan_reshard(spec.dims, layout, grid.rank, fmt=fmt, element_size=4, bucket_bytes=bucket_bytes)
        sources = [source.rows(t.rule, t.layer, t.index) for t in plan.train]  # the training shards
        dests = [torch.full(d.shape, float("nan")) for d in plan.dests]
        stats = Resharder(plan, sources, dests, micro_group=grid.micro_dp_group,
                          replica_group=grid.model_parallel_group).run()
        # reference: every destination cut straight from the HF tensors
        for ref, got in zip(plan.dests, dests):
            canonical = to_canonical(ref.rule, [source.ckpt.read(n) for n in _hf_names(ref)])
            want = take_shard(canonical, ref.index, ref.rule.index_dim)
            assert torch.equal(got, want), f"{ref.name} differs (tp={tp} pp={pp} vpp={vpp} → gen tp={gen_tp})"
        assert stats.recv_bytes == plan.recv_bytes, (stats.recv_bytes, plan.recv_bytes)
        # exactly what the rank's generation shard needs and its training shards do not hold
        assert plan.recv_elems == _lacking_elems(plan), (plan.recv_elems, _lacking_elems(plan))
        # and of the per-layer TP-split weights, the layout's recv_fraction: the least any assignment
        # gives, 1/(t_g·p_g) − 1/(max(t, t_g)·max(p, p_g)), where the layer intervals nest
        split = lambda ref: ref.rule.per_layer and ref.rule.dim is not None  # noqa: E731
        split_total = sum(t.numel for m in range(8) for t in plan_reshard(spec.dims, layout, m).train
                          if split(t)) // layout.dp
        assert Fraction(_lacking_elems(plan, split), split_total) == layout.recv_fraction(grid.rank)
        if vpp == 1 or gen_pp == 1:
            assert layout.recv_fraction(grid.rank) == layout.min_recv_fraction()
        assert stats.collectives == plan.num_collectives
        if tp % gen_tp == 0 and layout.micro_dp > 1 and gen_pp == 1:  # gathered: the formula, for the TP-split layers
            split_total = sum(t.numel for m in range(8) for t in plan_reshard(spec.dims, layout, m, element_size=4).train
                              if t.rule.per_layer and t.rule.dim is not None) // layout.dp * 4
            assert Fraction(plan.gathered_bytes(), split_total) == layout.formula_recv_fraction()
        return plan, stats
    finally:
        grid.destroy()


def _lacking_elems(plan, which=lambda ref: True) -> int:
    """Elements of the rank's destinations (those `which` selects) that none of its training shards holds."""
    held = {}
    for t in plan.train:
        held.setdefault(t.key, []).append(t.index)
    total = 0
    for d in plan.dests:
        if not which(d):
            continue
        lacking = d.index >= 0
        for index in held.get(d.key, []):
            lacking &= locate(d.index, index) < 0
        total += int(lacking.sum()) * (prod(d.shape[1:]) if d.rule.index_dim == 0 else d.shape[0])
    return total


def _hf_names(ref):
    from hybridflow_mg.models.layouts import hf_names

    return hf_names(ref.rule, ref.layer)


@rank_check
def tp2_pp2_to_gen_tp1_and_tp2():
    for gen_tp in (1, 2):
        _reshard(2, 2, gen_tp)


@rank_check
def tp4_pp1_to_gen_tp1_2_4():
    for gen_tp in (1, 2, 4):
        _reshard(4, 1, gen_tp)


@rank_check
def tp2_pp1_to_gen_tp1_and_tp2():
    for gen_tp in (1, 2):
        _reshard(2, 1, gen_tp)


@rank_check
def tp1_pp2_to_gen_tp1():
    _reshard(1, 2, 1)


@rank_check
def tp8_pp1_to_gen_tp2_and_tp8():
    for gen_tp in (2, 8):
        _reshard(8, 1, gen_tp)


@rank_check
def tp2_pp2_vpp2_to_gen_tp1():
    _reshard(2, 2, 1, vpp=2)


@rank_check
def gen_tp_larger_than_training_tp():
    for tp, pp in ((2, 2), (2, 1), (1, 2)):  # t_g = 4: each rank receives (p − 1)/(t_g·p) of the layers
        plan, _ = _reshard(tp, pp, 4)
        assert not plan.gathers


@rank_check
def generation_pipeline_stages():
    for tp, pp, gen_tp, vpp in ((2, 2, 2, 1), (2, 2, 1, 1), (2, 1, 2, 1), (1, 4, 1, 1), (2, 2, 1, 2)):
        plan, _ = _reshard(tp, pp, gen_tp, vpp=vpp, gen_pp=2)  # each rank: its vLLM stage's parameters only
        assert {d.layer for d in plan.dests if d.layer is not None} == ({0, 1}, {2, 3})[plan.layout.gen_coord(plan.rank).pp]


@rank_check
def full_hf_state_dict_destination():
    _reshard(2, 2, 1, fmt="hf")


@rank_check
def collectives_equal_buckets_not_tensors():
    plan_small, stats_small = _reshard(4, 1, 2, bucket_bytes=1 << 30)
    assert stats_small.collectives == len(plan_small.gathers) + len(plan_small.exchanges) <= 3
    assert len(plan_small.train) > 10 * stats_small.collectives  # many tensors, few collectives

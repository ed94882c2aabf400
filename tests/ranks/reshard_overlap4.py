"""4-rank checks of the overlapped reshard executor (two workspace slots, async gloo collectives): it
writes the same bits as the serial one and the reference cut from the canonical tensors, and receives
the same bytes in the same number of collectives. Small buckets, so every layout has many of them."""
from __future__ import annotations

import torch

from hybridflow_mg.models.hf_spec import spec_from_hf
from hybridflow_mg.models.layouts import canonical_shape, rules_for
from hybridflow_mg.models.rowmaps import take_shard
from hybridflow_mg.parallel.grid import Grid
from hybridflow_mg.parallel.layout import ParallelLayout
from hybridflow_mg.reshard.execute import Resharder
from hybridflow_mg.reshard.plan import plan_reshard
from tests.multirank import rank_check
from tests.tiny import llama_config

# GQA 8 heads / 4 KV heads (tp up to 4), vocab 250 (padded rows), 4 layers (pp up to 4)
DIMS = spec_from_hf(llama_config(hidden_size=128, intermediate_size=192, num_attention_heads=8,
                                 num_key_value_heads=4, num_hidden_layers=4)).dims


def _canonical() -> dict:
    """Every canonical tensor of DIMS, the same on every rank (fixed seed)."""
    gen = torch.Generator().manual_seed(0)
    return {(rule.key, layer): torch.randn(canonical_shape(rule, DIMS), generator=gen)
            for rule in rules_for(DIMS) for layer in (range(DIMS.num_layers) if rule.per_layer else [None])}


def _run(plan, grid, sources, **options):
    dests = [torch.full(d.shape, float("nan")) for d in plan.dests]
    resharder = Resharder(plan, sources, dests, micro_group=grid.micro_dp_group,
                          replica_group=grid.model_parallel_group, **options)
    return resharder, resharder.run(), dests


def _compare(tp, pp, gen_tp, *, gen_pp=1, bucket_bytes=4_000, min_gathers=0, min_exchanges=2, **options):
    """Serial and overlapped on one layout: bit-identical to each other and to the reference, bytes and
    calls equal to the plan, the overlapped workspace two slots. Returns the plan."""
    layout = ParallelLayout(world=4, tp=tp, pp=pp, gen_tp=gen_tp, gen_pp=gen_pp)
    grid = Grid.create(layout)
    try:
        canonical = _canonical()
        plan = plan_reshard(DIMS, layout, grid.rank, element_size=4, bucket_bytes=bucket_bytes)
        assert len(plan.gathers) >= min_gathers and len(plan.exchanges) >= min_exchanges, \
            (len(plan.gathers), len(plan.exchanges))
        sources = [take_shard(canonical[t.key], t.index, t.rule.index_dim) for t in plan.train]
        serial, serial_stats, serial_dests = _run(plan, grid, sources, overlap=False, **options)
        over, over_stats, over_dests = _run(plan, grid, sources, overlap=True, **options)
        where = f"tp={tp} pp={pp} → gen tp={gen_tp} pp={gen_pp}"
        assert not serial.overlap and over.overlap and over_stats.overlapped, where
        for ref, a, b in zip(plan.dests, serial_dests, over_dests):
            want = take_shard(canonical[ref.key], ref.index, ref.rule.index_dim)
            assert torch.equal(a, want), f"serial: {ref.name} differs ({where})"
            assert torch.equal(b, want), f"overlapped: {ref.name} differs ({where})"
        for stats in (serial_stats, over_stats):
            assert stats.recv_bytes == plan.recv_bytes, (stats.recv_bytes, plan.recv_bytes, where)
            assert stats.collectives == plan.num_collectives, where
        slot = serial_stats.peak_buffer_bytes
        assert slot == serial.slot_numel * 4 and over_stats.peak_buffer_bytes == (-(-slot // 256) * 256 + slot), where

        # the kept workspace again, with every written row spoiled first: the second run writes it all back
        for ref, t in zip(plan.dests, over_dests):
            valid = (ref.index >= 0).nonzero().squeeze(1)
            t.index_fill_(ref.rule.index_dim, valid, float("nan"))
        again = over.run()
        assert again.recv_bytes == plan.recv_bytes and all(torch.equal(a, b) for a, b in zip(serial_dests, over_dests))
        return plan
    finally:
        grid.destroy()


@rank_check
def gather_and_exchange_buckets_tp2_pp2_to_gen_tp1():
    _compare(2, 2, 1, min_gathers=8)  # d_g = 4


@rank_check
def gather_buckets_by_all_gather_into_tensor():
    _compare(2, 2, 1, min_gathers=8, gather_by_alltoall=False)  # gloo's async allgather path


@rank_check
def micro_dp_of_2_tp2_pp2_to_gen_tp2():
    _compare(2, 2, 2, min_gathers=4)


@rank_check
def data_parallel_replicas_tp1_pp2_to_gen_tp1():
    _compare(1, 2, 1, min_gathers=4)  # dp = 2: two replicas reshard side by side


@rank_check
def exchange_buckets_only_gen_tp_larger_than_training():
    _compare(2, 2, 4, min_exchanges=4)  # t_g > t: everything is exchanged


@rank_check
def generation_pipeline_stages():
    _compare(2, 2, 1, gen_pp=2, min_exchanges=1)  # each rank writes its vLLM stage only


@rank_check
def memory_bound_falls_back_to_one_slot():
    layout = ParallelLayout(world=4, tp=2, pp=2, gen_tp=1)
    grid = Grid.create(layout)
    try:
        canonical = _canonical()
        plan = plan_reshard(DIMS, layout, grid.rank, element_size=4, bucket_bytes=4_000)
        sources = [take_shard(canonical[t.key], t.index, t.rule.index_dim) for t in plan.train]
        _, free, _ = _run(plan, grid, sources, overlap=True)
        _, serial, _ = _run(plan, grid, sources, overlap=False)
        _, bound, dests = _run(plan, grid, sources, overlap=True, max_workspace_bytes=free.peak_buffer_bytes - 1)
        assert free.overlapped and not bound.overlapped and bound.peak_buffer_bytes == serial.peak_buffer_bytes
        _, fits, _ = _run(plan, grid, sources, overlap=True, max_workspace_bytes=free.peak_buffer_bytes)
        assert fits.overlapped and fits.peak_buffer_bytes == free.peak_buffer_bytes
        assert bound.recv_bytes == plan.recv_bytes
        for ref, t in zip(plan.dests, dests):
            assert torch.equal(t, take_shard(canonical[ref.key], ref.index, ref.rule.index_dim)), ref.name
    finally:
        grid.destroy()

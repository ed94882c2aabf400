"""The pure layout plan: micro-DP groups, shard containment and recv_fraction (no processes)."""
from fractions import Fraction

import pytest

from hybridflow_mg.parallel.layout import ParallelLayout

MATRIX = [(2, 2, 2), (4, 1, 2), (1, 2, 4), (8, 1, 1), (2, 4, 1)]


def _divisors(n):
    return [k for k in range(1, n + 1) if n % k == 0]


@pytest.mark.parametrize("tp,pp,dp", MATRIX)
def test_every_gen_tp_dividing_t_is_zero_redundancy(tp, pp, dp):
    for gen_tp in _divisors(tp):
        lay = ParallelLayout.create(world=8, tp=tp, pp=pp, dp=dp, gen_tp=gen_tp)
        d_g = tp * pp // gen_tp
        assert lay.micro_dp == d_g
        assert all(len(g) == d_g for g in lay.micro_dp_groups)
        assert sorted(r for g in lay.micro_dp_groups for r in g) == list(range(8))
        for rank in range(8):
            # the training shard (its TP slice and its layers) lies inside its own generation shard
            (t0, t1), layers = lay.train_shard(rank)
            (g0, g1), (gen_layers,) = lay.gen_shard(rank)
            assert g0 <= t0 and t1 <= g1
            assert all(gen_layers[0] <= a and b <= gen_layers[1] for a, b in layers)
            assert lay.shard_inside_gen(rank)
            assert lay.recv_fraction(rank) == Fraction(d_g - 1, tp * pp)
        # every member of a micro-DP group holds the same generation shard, different training shards
        for group in lay.micro_dp_groups:
            assert len({(lay.gen_coord(r).tp, lay.gen_coord(r).pp) for r in group}) == 1
            assert len({(lay.train_coord(r).tp, lay.train_coord(r).pp) for r in group}) == len(group)


def test_training_coords_follow_megatron_order():
    lay = ParallelLayout(world=8, tp=2, pp=2, gen_tp=2)  # order tp-cp-ep-dp-pp: rank = tp + t·(dp + d·pp)
    assert [(c.tp, c.dp, c.pp) for c in map(lay.train_coord, range(8))] == [
        (0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 1), (1, 1, 1)]
    assert lay.tp_groups == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert lay.pp_groups == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert lay.dp_groups == [[0, 2], [1, 3], [4, 6], [5, 7]]


def test_gen_tp_groups_are_strided_when_gen_tp_is_smaller():
    # HybridFlow Fig. 8: t=4 → t_g=2: micro-DP groups are consecutive, generation TP groups strided.
    lay = ParallelLayout(world=8, tp=4, pp=1, gen_tp=2)
    assert lay.micro_dp_groups == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert lay.gen_tp_groups == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert lay.vllm_rank_order == [0, 2, 1, 3, 4, 6, 5, 7]
    # vLLM's consecutive TP groups [[0,1],[2,3],...] map onto the strided world groups
    assert lay.vllm_groups([[0, 1], [2, 3], [4, 5], [6, 7]]) == lay.gen_tp_groups


@pytest.mark.parametrize("world", [1, 2, 4, 6, 8, 12, 16])
def test_every_valid_layout_plans_a_consistent_grid(world):
    for tp in _divisors(world):
        for pp in _divisors(world // tp):
            for gen_tp in _divisors(world):
                for gen_pp in _divisors(world // gen_tp):
                    try:
                        lay = ParallelLayout(world=world, tp=tp, pp=pp, gen_tp=gen_tp, gen_pp=gen_pp)
                    except ValueError:
                        continue  # non-nested axes are refused with a message (tested below)
                    assert sorted(lay.vllm_rank_order) == list(range(world))
                    for group in lay.gen_tp_groups:  # vLLM position = sorted world order = gen tp rank
                        assert group == sorted(group)
                        assert [lay.gen_coord(r).tp for r in group] == list(range(gen_tp))
                    assert len(lay.gen_replica_groups) == lay.num_gen_replicas
                    for rank in range(world):
                        assert 0 <= lay.recv_fraction(rank) <= Fraction(1, gen_tp * gen_pp)
                        if lay.formula_applies:
                            assert lay.recv_fraction(rank) == lay.formula_recv_fraction()


def test_gen_tp_larger_than_train_tp_receives_the_minimum():
    lay = ParallelLayout(world=4, tp=2, pp=2, gen_tp=4)
    # generation shard = 1/4 of M; the best one for each rank is the quarter inside its own TP half,
    # of which it holds its stage's layers: an eighth held, an eighth received (not 1/4 for ranks 1, 2)
    assert [lay.recv_fraction(r) for r in range(4)] == [Fraction(1, 8)] * 4 == [lay.min_recv_fraction()] * 4
    assert not any(lay.shard_inside_gen(r) for r in range(4))
    assert all(len(g) == 1 for g in lay.micro_dp_groups)
    # vLLM's positions stay sorted (ranks 0..3); the layer slices follow the training TP slices
    assert [lay.gen_coord(r).tp for r in range(4)] == [0, 1, 2, 3]
    assert [lay.gen_coord(r).weight_tp for r in range(4)] == [0, 2, 1, 3]
    assert [lay.gen_coord(1).tp_for(kind) for kind in ("vocab", "qkv", "plain")] == [1, 2, 2]


def test_llama70b_nemo_rl_layout_receives_three_32nds_on_every_rank():
    lay = ParallelLayout.create(world=64, tp=4, pp=4, dp=4, gen_tp=8)  # NeMo-RL's 70B GRPO layout
    assert {lay.recv_fraction(r) for r in range(64)} == {Fraction(3, 32)} == {lay.min_recv_fraction()}


def _brute_force_min_recv(lay):
    """Over every assignment of the world's ranks to its generation shards: the least total received,
    and each rank's least possible (1/(t_g·p_g) minus the most any shard lets it hold)."""
    from itertools import permutations

    from hybridflow_mg.parallel.layout import _overlap

    slots = [((Fraction(g, lay.gen_tp), Fraction(g + 1, lay.gen_tp)), [(Fraction(s, lay.gen_pp), Fraction(s + 1, lay.gen_pp))])
             for _ in range(lay.num_gen_replicas) for s in range(lay.gen_pp) for g in range(lay.gen_tp)]
    held = [[_overlap([lay.train_shard(r)[0]], [tp_iv]) * _overlap(lay.train_shard(r)[1], layer_ivs)
             for tp_iv, layer_ivs in slots] for r in range(lay.world)]
    scale = (lay.tp * lay.pp * lay.gen_tp * lay.gen_pp * lay.vpp) ** 2  # integers: fast sums
    ints = [[int(h * scale) for h in row] for row in held]
    best = max(sum(row[s] for row, s in zip(ints, perm)) for perm in permutations(range(len(slots))))
    shard = Fraction(1, lay.gen_tp * lay.gen_pp)
    return lay.world * shard - Fraction(best, scale), [shard - max(row) for row in held]


PAIRS = [(t, p, tg, pg, vpp) for t in (1, 2, 4, 8) for p in (1, 2, 4, 8) if t * p <= 8
         for tg in (1, 2, 4, 8) for pg in (1, 2, 4, 8) if max(t * p, tg * pg) % min(t * p, tg * pg) == 0
         and max(t * p, tg * pg) <= 8 for vpp in ((1, 2) if p > 1 else (1,))]


@pytest.mark.parametrize("tp,pp,gen_tp,gen_pp,vpp", PAIRS)
def test_recv_fraction_is_the_brute_force_minimum(tp, pp, gen_tp, gen_pp, vpp):
    """The foundation's matrix and every t_g > t case on worlds of up to 8 ranks (generation replicas
    inside one training replica, and spanning several)."""
    try:
        lay = ParallelLayout(world=max(tp * pp, gen_tp * gen_pp), tp=tp, pp=pp, vpp=vpp, gen_tp=gen_tp, gen_pp=gen_pp)
    except ValueError:
        pytest.skip("a refused layout (non-nested axes)")
    total, per_rank = _brute_force_min_recv(lay)
    ours = [lay.recv_fraction(r) for r in range(lay.world)]
    assert lay.min_recv_fraction() == max(per_rank)  # the worst-placed rank's own best, whatever vpp and p_g
    if gen_pp == 1:  # what the resharder and the engine run: every rank at its own minimum
        assert ours == per_rank
        assert set(ours) == {lay.min_recv_fraction()}
        assert sum(ours) == total
    else:  # with vpp > 1, vLLM's stage order (a stage is its sorted position) can cost more than the brute force
        assert sum(ours) >= total


def test_vpp_layers_are_interleaved_and_still_inside_a_pp1_gen_shard():
    lay = ParallelLayout(world=8, tp=2, pp=4, vpp=2, gen_tp=2)
    _, layers = lay.train_shard(2)  # pp stage 1: chunks 1 and 5 of 8
    assert layers == [(Fraction(1, 8), Fraction(2, 8)), (Fraction(5, 8), Fraction(6, 8))]
    assert all(lay.recv_fraction(r) == Fraction(3, 8) for r in range(8))


@pytest.mark.parametrize("kwargs,message", [
    (dict(world=8, tp=3, pp=1, dp=None), "does not divide the world"),
    (dict(world=8, tp=2, pp=2, dp=3), "make tp·pp·dp equal 8"),
    (dict(world=4, tp=2, pp=2, gen_tp=8), "does not divide the training tp·pp"),  # 8 ranks > the world
    (dict(world=8, tp=4, pp=1, gen_tp=8, gen_pp=2), "does not divide the training tp·pp"),
    (dict(world=8, tp=2, pp=2, gen_tp=3), "does not divide the training tp·pp"),
    (dict(world=8, tp=0, pp=2), "must be a positive integer"),
    (dict(world=8, tp=2, pp=-1), "must be a positive integer"),
    (dict(world=8, tp=2, pp=1, vpp=2), "needs pp > 1"),
    (dict(world=6, tp=2, pp=3, gen_tp=3, gen_pp=2), "must each divide or be a multiple"),
])
def test_bad_layouts_raise_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        ParallelLayout.create(**kwargs)
    assert "\n" not in str(err.value)

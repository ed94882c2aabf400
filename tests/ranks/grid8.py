"""8-rank checks of the process grid: megatron-core's groups equal the plan; all-reduces add up."""
from __future__ import annotations

import torch.distributed as dist

from hybridflow_mg.parallel.checks import check_grid_collectives
from hybridflow_mg.parallel.grid import Grid
from hybridflow_mg.parallel.layout import ParallelLayout
from tests.multirank import rank_check


def _check_layout(tp: int, pp: int, dp: int, gen_tps: list[int], vpp: int = 1) -> None:
    assert dist.get_world_size() == tp * pp * dp == 8
    for gen_tp in gen_tps:
        layout = ParallelLayout.create(world=8, tp=tp, pp=pp, dp=dp, vpp=vpp, gen_tp=gen_tp)
        grid = Grid.create(layout)
        try:
            seen = check_grid_collectives(grid)
            assert len(seen["micro_dp"]) == layout.micro_dp
            assert len(seen["gen_tp"]) == gen_tp
        finally:
            grid.destroy()


@rank_check
def tp2_pp2_dp2():
    _check_layout(2, 2, 2, [1, 2, 4])  # 4 > t: planned and grouped, though shards cannot nest


@rank_check
def tp4_pp1_dp2():
    _check_layout(4, 1, 2, [1, 2, 4])


@rank_check
def tp1_pp2_dp4():
    _check_layout(1, 2, 4, [1])


@rank_check
def tp8_pp1_dp1():
    _check_layout(8, 1, 1, [1, 2, 4, 8])


@rank_check
def tp2_pp4_dp1():
    _check_layout(2, 4, 1, [1, 2])


@rank_check
def tp2_pp4_vpp2():
    _check_layout(2, 4, 1, [1, 2], vpp=2)

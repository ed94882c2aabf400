"""Live checks of a `Grid`: every group's all-reduce must give the sum the plan predicts.

Used by `hybridflow-mg grid --init` (a user checking a cluster layout before a long run) and by the
multi-rank tests.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

GROUPS = ("tp", "pp", "dp", "model_parallel", "micro_dp", "gen_tp", "gen_pp", "gen_replica")


def planned_groups(grid, name: str) -> list[list[int]]:
    lay = grid.layout
    return {"tp": lay.tp_groups, "pp": lay.pp_groups, "dp": lay.dp_groups,
            "model_parallel": lay.model_parallel_groups, "micro_dp": lay.micro_dp_groups,
            "gen_tp": lay.gen_tp_groups, "gen_pp": lay.gen_pp_groups, "gen_replica": lay.gen_replica_groups}[name]


def check_grid_collectives(grid) -> dict[str, list[int]]:
    """All-reduce (rank + 1) over each group; raise if a sum or a membership differs from the plan."""
    seen = {}
    for name in GROUPS:
        mine = next(g for g in planned_groups(grid, name) if grid.rank in g)
        ranks = grid.group_ranks(name)
        if sorted(ranks) != mine:
            raise RuntimeError(f"rank {grid.rank}: {name} group is {ranks}, planned {mine}")
        value = torch.tensor([float(grid.rank + 1)], device=grid.device)
        dist.all_reduce(value, group=getattr(grid, f"{name}_group"))
        expected = float(sum(r + 1 for r in mine))
        if value.item() != expected:
            raise RuntimeError(f"rank {grid.rank}: all-reduce over {name} group {mine} gave {value.item()}, "
                               f"expected {expected}")
        seen[name] = mine
    return seen

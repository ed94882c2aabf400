"""The one grid object: the layouts (`ParallelLayout`), this rank's place in them, and every process group.

`Grid.create(layout)` starts megatron-core's parallel state for the training layout (gloo on CPU,
NCCL on GPU), checks that megatron-core built exactly the groups the layout plans, and creates the
HybridFlow groups megatron-core does not know: micro-DP groups (the only reshard traffic), the
generation TP/PP groups, and the generation replicas. Everything else in the package asks the grid,
never `parallel_state` or `torch.distributed.get_rank()` directly, for parallel facts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from hybridflow_mg.parallel.layout import GenCoord, ParallelLayout, TrainCoord


def _live_groups() -> set:
    """Every process group of this process except the default one (torch keeps them in its world map)."""
    world = getattr(dist.distributed_c10d, "_world", None)
    groups = set(getattr(world, "pg_map", {}) or {})
    return {g for g in groups if g is not dist.GroupMember.WORLD and g is not dist.distributed_c10d._get_default_group()}


def on_rank0(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` on global rank 0 only (file system work: run directories, checkpoints), its result
    given to every rank; when it raises, every rank raises the same exception (the others would
    otherwise wait for rank 0 forever). Collective over the world; `fn`'s result must pickle."""
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box = [("ok", fn(*args))]
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            box = [("error", e)]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def _subgroup(groups: list[list[int]], rank: int, created: list, timeout: timedelta | None) -> dist.ProcessGroup:
    """Create every group in `groups` (all ranks take part, as torch requires) and return ours."""
    mine = None
    for ranks in groups:
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            mine = group
            created.append(group)
    assert mine is not None, f"rank {rank} is in none of {groups}"
    return mine


@dataclass
class Grid:
    layout: ParallelLayout
    rank: int
    device: torch.device
    backend: str
    train: TrainCoord = field(init=False)
    gen: GenCoord = field(init=False)
    # megatron-core's groups (training layout)
    tp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    pp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    dp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    model_parallel_group: dist.ProcessGroup | None = field(default=None, repr=False)
    # HybridFlow's groups (generation layout)
    micro_dp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    gen_tp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    gen_pp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    gen_replica_group: dist.ProcessGroup | None = field(default=None, repr=False)
    _owned: list = field(default_factory=list, repr=False)
    _groups_before: set = field(default_factory=set, repr=False)

    def __post_init__(self):
        self.train = self.layout.train_coord(self.rank)
        self.gen = self.layout.gen_coord(self.rank)

    @classmethod
    def create(cls, layout: ParallelLayout, device: torch.device | None = None, seed: int = 1234,
               timeout_minutes: int | None = None) -> "Grid":
        """Build all groups; torch.distributed must already run over exactly `layout.world` ranks.

        `timeout_minutes` (`dist.timeout_minutes`) governs every group made here, megatron-core's too
        (a collective that waits longer for a stuck rank fails); left out, torch's default.
        Also seeds megatron-core's RNG streams (default and per-TP-rank model-parallel tracker) with
        `seed`, as `model_parallel_cuda_manual_seed` does: attention forks the tracker even without dropout.
        """
        from megatron.core import parallel_state as mpu

        if not dist.is_initialized():
            raise RuntimeError("start torch.distributed first (hybridflow_mg.parallel.launch.init_distributed)")
        if dist.get_world_size() != layout.world:
            raise ValueError(f"the layout plans {layout.world} ranks but {dist.get_world_size()} were launched; "
                             f"launch {layout.world} processes or change the layout")
        rank = dist.get_rank()
        device = device or torch.device("cpu")
        grid = cls(layout=layout, rank=rank, device=device, backend=dist.get_backend())

        if device.type == "cpu":
            from hybridflow_mg.parallel.cpu_shims import apply_cpu_shims

            apply_cpu_shims()
        if mpu.model_parallel_is_initialized():
            mpu.destroy_model_parallel()
        grid._groups_before = _live_groups()
        timeout = timedelta(minutes=timeout_minutes) if timeout_minutes else None
        mpu.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
            **({"distributed_timeout_minutes": timeout_minutes} if timeout_minutes else {}),
        )
        grid.tp_group = mpu.get_tensor_model_parallel_group()
        grid.pp_group = mpu.get_pipeline_model_parallel_group()
        grid.dp_group = mpu.get_data_parallel_group()
        grid.model_parallel_group = mpu.get_model_parallel_group()
        grid._check_megatron_matches_plan()
        from hybridflow_mg.parallel.cpu_shims import seed_model_parallel

        seed_model_parallel(seed, grid.train.tp)

        grid.micro_dp_group = _subgroup(layout.micro_dp_groups, rank, grid._owned, timeout)
        grid.gen_tp_group = _subgroup(layout.gen_tp_groups, rank, grid._owned, timeout)
        grid.gen_pp_group = _subgroup(layout.gen_pp_groups, rank, grid._owned, timeout)
        grid.gen_replica_group = _subgroup(layout.gen_replica_groups, rank, grid._owned, timeout)
        return grid

    def _check_megatron_matches_plan(self) -> None:
        from megatron.core import parallel_state as mpu

        lay = self.layout
        for name, group, planned in (("tp", self.tp_group, lay.tp_groups), ("pp", self.pp_group, lay.pp_groups),
                                     ("dp", self.dp_group, lay.dp_groups),
                                     ("model-parallel", self.model_parallel_group, lay.model_parallel_groups)):
            ranks = dist.get_process_group_ranks(group)
            mine = next(g for g in planned if self.rank in g)
            if sorted(ranks) != mine:
                raise RuntimeError(f"megatron-core's {name} group {ranks} differs from the planned {mine}")
        got = (mpu.get_tensor_model_parallel_rank(), mpu.get_pipeline_model_parallel_rank(), mpu.get_data_parallel_rank())
        if got != (self.train.tp, self.train.pp, self.train.dp):
            raise RuntimeError(f"megatron-core places rank {self.rank} at tp,pp,dp={got}, the plan at {self.train}")

    # --- facts ---------------------------------------------------------------------------------------
    @property
    def world(self) -> int:
        return self.layout.world

    @property
    def is_first_stage(self) -> bool:
        return self.train.pp == 0

    @property
    def is_last_stage(self) -> bool:
        return self.train.pp == self.layout.pp - 1

    @property
    def is_logging_rank(self) -> bool:
        """One rank writes metrics, configs and summaries: global rank 0."""
        return self.rank == 0

    def group_ranks(self, name: str) -> list[int]:
        """World ranks of this rank's group `name` (tp, pp, dp, model_parallel, micro_dp, gen_tp, ...)."""
        return dist.get_process_group_ranks(getattr(self, f"{name}_group"))

    def destroy(self) -> None:
        """Tear down every group this grid made (megatron-core's too); the default group stays."""
        from megatron.core import parallel_state as mpu

        # megatron-core's destroy_model_parallel only forgets its groups; destroying them here (and ours)
        # closes their connections, so building grid after grid in one process (tests) leaks nothing
        for group in _live_groups() - self._groups_before:
            dist.destroy_process_group(group)
        self._owned.clear()
        mpu.destroy_model_parallel()

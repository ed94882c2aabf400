"""`hybridflow-mg grid`: the training and generation layouts, micro-DP groups and reshard traffic.

Without a launcher it only plans (pure arithmetic, no processes). With `--init`, run under
torchrun/srun/mpirun, every rank starts the real process grid and checks it by all-reduces.
"""
from __future__ import annotations

import argparse

from hybridflow_mg.commands._args import parse_sizes
from hybridflow_mg.parallel.layout import ParallelLayout


def add_parser(sub) -> None:
    p = sub.add_parser("grid", help="show the 3D grid: layouts, micro-DP groups, bytes per reshard",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, help="number of ranks (default under --init: the launched world)")
    p.add_argument("--train", required=True, metavar="tp=T,pp=P[,vpp=V][,dp=D]", help="training layout")
    p.add_argument("--gen", default="", metavar="tp=TG[,pp=PG]", help="generation layout (default: tp as training)")
    p.add_argument("--json", action="store_true", help="print one JSON object with a `ranks` list")
    p.add_argument("--init", action="store_true", help="start the real process grid under the current launcher")
    p.set_defaults(run=run)


def layout_from_args(world: int | None, train: str, gen: str) -> ParallelLayout:
    t = parse_sizes(train, ("tp", "pp", "vpp", "dp"), "--train")
    g = parse_sizes(gen, ("tp", "pp"), "--gen")
    if world is None:
        if "dp" not in t:
            raise ValueError("give --world N (or dp= in --train) so the data-parallel size is known")
        world = t.get("tp", 1) * t.get("pp", 1) * t["dp"]
    return ParallelLayout.create(world=world, tp=t.get("tp", 1), pp=t.get("pp", 1), vpp=t.get("vpp", 1),
                                 dp=t.get("dp"), gen_tp=g.get("tp"), gen_pp=g.get("pp", 1))


def run(args) -> int:
    if not args.init:
        layout = layout_from_args(args.world, args.train, args.gen)
        print(layout.to_json() if args.json else layout.to_table())
        return 0
    from hybridflow_mg.parallel.launch import discover, init_distributed
    from hybridflow_mg.parallel.grid import Grid
    from hybridflow_mg.parallel.checks import check_grid_collectives

    layout = layout_from_args(args.world or discover().world_size, args.train, args.gen)
    info, device = init_distributed()
    grid = Grid.create(layout, device)
    check_grid_collectives(grid)
    if grid.is_logging_rank:
        print(layout.to_json() if args.json else layout.to_table())
        print(f"process grid initialised on {layout.world} ranks ({info.launcher}, {grid.backend}); "
              f"all-reduces over tp, pp, dp, micro-DP and generation groups gave the planned sums")
    grid.destroy()
    import torch.distributed as dist

    dist.destroy_process_group()
    return 0

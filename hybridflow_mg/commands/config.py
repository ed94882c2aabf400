"""`hybridflow-mg config`: resolve a preset plus overrides, validate it, print it as YAML.

With `--world N` the parallel section is also checked against N ranks. Use it to see exactly what a
run would use before launching it.
"""
from __future__ import annotations

import yaml

from hybridflow_mg.config.load import load_config, to_dict


def add_parser(sub) -> None:
    p = sub.add_parser("config", help="print the resolved config (preset + overrides)", description=__doc__)
    p.add_argument("preset", nargs="?", help="YAML preset, e.g. configs/quickstart.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. parallel.train.tp=2")
    p.add_argument("--world", type=int, help="also check the parallel layout against this many ranks")
    p.set_defaults(run=run)


def layout_of(cfg, world: int):
    from hybridflow_mg.parallel.layout import ParallelLayout

    t, g = cfg.parallel.train, cfg.parallel.gen
    return ParallelLayout.create(world=world, tp=t.tp, pp=t.pp, vpp=t.vpp, dp=t.dp, gen_tp=g.tp, gen_pp=g.pp)


def run(args) -> int:
    preset, overrides = args.preset, list(args.overrides)
    if preset and "=" in preset:  # only overrides were given
        preset, overrides = None, [preset, *overrides]
    from hybridflow_mg.trainer.config import TrainConfig

    cfg = load_config(TrainConfig, preset, overrides)
    if args.world is not None:
        layout_of(cfg, args.world)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0

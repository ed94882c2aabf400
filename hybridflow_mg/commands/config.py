"""`hybridflow-mg config`: resolve a preset plus overrides, validate it, print it as YAML.

With `--world N` the parallel section and the batch split are also checked against N ranks, as
`train --nproc N` checks them. Use it to see exactly what a run would use before launching it;
`--get KEY` prints one resolved value (scripts: `--get run.output_dir`).
"""
from __future__ import annotations

import yaml

from hybridflow_mg.config.load import load_config, to_dict


def add_parser(sub) -> None:
    p = sub.add_parser("config", help="print the resolved config (preset + overrides)", description=__doc__)
    p.add_argument("preset", nargs="?", help="YAML preset, e.g. configs/quickstart.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. parallel.train.tp=2")
    p.add_argument("--world", type=int, help="also check the parallel layout against this many ranks")
    p.add_argument("--get", metavar="KEY", help="print only this dotted key's resolved value, e.g. run.output_dir")
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
        from hybridflow_mg.trainer.config import check_batch_split

        check_batch_split(cfg, layout_of(cfg, args.world).dp)
    if args.get:
        value = to_dict(cfg)
        for part in args.get.split("."):
            if not isinstance(value, dict) or part not in value:
                raise ValueError(f"--get {args.get}: no such config key")
            value = value[part]
        print(value if not isinstance(value, (dict, list)) else yaml.safe_dump(value, sort_keys=False), end="\n")
        return 0
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0

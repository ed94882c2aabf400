"""`hybridflow-mg train CONFIG [key=value ...]`: the RL loop, under torchrun / srun / mpirun.

A thin wrapper around `Trainer(config).fit()` (trainer/trainer.py). `--nproc N` starts N local
processes with torchrun (the CPU quickstart uses 4). The run directory (`run.output_dir/run.name`)
gets the resolved config, `metrics.jsonl`, and the final actor checkpoint.
"""
from __future__ import annotations

import os
import subprocess
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="run RL training (PPO, GRPO, ...)", description=__doc__)
    p.add_argument("config", help="YAML preset, e.g. configs/quickstart.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. algo.advantage.estimator=gae")
    p.add_argument("--nproc", type=int, default=None, help="start this many local processes (torchrun)")
    p.set_defaults(run=run)


def preflight(cfg) -> None:
    """What can be checked without processes, checked before any start: data files, columns, rewards."""
    from hybridflow_mg.data.datasets import check_files
    from hybridflow_mg.rewards import build_reward_fn

    if cfg.model.synthetic is None:
        check_files(cfg.data)
        for path, key in ((cfg.model.path, "model.path"), (cfg.model.critic_path, "model.critic_path"),
                          (cfg.model.reward_model_path, "model.reward_model_path")):
            if path is not None and not os.path.isfile(os.path.join(path, "config.json")):
                raise FileNotFoundError(f"{key} = {path!r} is not an HF model directory (no config.json)")
    build_reward_fn(cfg.reward)


def run(args) -> int:
    from hybridflow_mg.config.load import load_config
    from hybridflow_mg.parallel.launch import discover
    from hybridflow_mg.trainer.config import TrainConfig

    cfg = load_config(TrainConfig, args.config, args.overrides)  # bad keys fail here, before any launch
    preflight(cfg)
    if args.nproc and discover().world_size == 1:
        from hybridflow_mg.commands.config import layout_of
        from hybridflow_mg.trainer.setup import check_batch_split

        check_batch_split(cfg, layout_of(cfg, args.nproc).dp)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               "-m", "hybridflow_mg.cli", "train", args.config, *args.overrides]
        return subprocess.call(cmd)
    from hybridflow_mg.trainer.trainer import Trainer

    Trainer(cfg).fit()
    return 0

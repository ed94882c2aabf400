"""`hybridflow-mg train CONFIG [key=value ...]`: the RL loop, under torchrun / srun / mpirun.

A thin wrapper around `Trainer(config).fit()` (trainer/trainer.py). `--nproc N` starts N local
processes (parallel/local_launch.py; the CPU quickstart uses 4). The run directory (`run.output_dir/run.name`)
gets the resolved config, `metrics.jsonl`, and checkpoints (the final one holds the actor's weights, the
optimizer states, the trainer state, and the critic's and the reference's weights when the run has them).
"""
from __future__ import annotations

import dataclasses
import os


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="run RL training (PPO, GRPO, ...)", description=__doc__)
    p.add_argument("config", help="YAML preset, e.g. configs/quickstart.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. algo.advantage.estimator=gae")
    p.add_argument("--nproc", type=int, default=None,
                   help="start this many local processes (parallel/local_launch.py); leave out under a launcher")
    p.set_defaults(run=run)


def preflight(cfg, *, launching: bool = False) -> None:
    """What can be checked without processes, checked before any start: data files, columns, models,
    rewards, the run directory, and a checkpoint named by `trainer.resume`. `launching` (the process
    that starts the workers) also reads and tokenizes every prompt and checks lengths against the
    model (`trainer/inputs.py`), which each rank does anyway under another launcher."""
    from hybridflow_mg.data.datasets import check_files
    from hybridflow_mg.rewards import build_reward_fn
    from hybridflow_mg.trainer.bootstrap import check_fresh_start, check_output_dir
    from hybridflow_mg.trainer.inputs import check_device

    check_output_dir(cfg)
    check_device(cfg)
    if cfg.model.synthetic is None:
        check_files(cfg.data)
        warm = cfg.actor.warm_start
        if warm.steps and warm.files:
            check_files(dataclasses.replace(cfg.data, train_files=warm.files, val_files=[]))
        for path, key in ((cfg.model.path, "model.path"), (cfg.model.critic_path, "model.critic_path"),
                          (cfg.model.reward_model_path, "model.reward_model_path")):
            if path is not None and not os.path.isfile(os.path.join(path, "config.json")):
                raise FileNotFoundError(f"{key} = {path!r} is not an HF model directory (no config.json)")
    build_reward_fn(cfg.reward)
    if launching and cfg.model.synthetic is None:
        from hybridflow_mg.trainer.inputs import load_inputs

        load_inputs(cfg)
    check_fresh_start(cfg)  # resume=never over an earlier run's checkpoints needs run.overwrite=true
    if cfg.trainer.resume not in ("auto", "never"):  # a named checkpoint: exists, complete, no file cut short
        from hybridflow_mg.checkpoint.training import named
        from hybridflow_mg.trainer.bootstrap import run_dir

        named(cfg.trainer.resume, run_dir(cfg) / "checkpoints")


def run(args) -> int:
    from hybridflow_mg.config.load import load_config
    from hybridflow_mg.parallel.launch import discover
    from hybridflow_mg.trainer.config import TrainConfig

    if args.nproc is not None and args.nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {args.nproc}")
    cfg = load_config(TrainConfig, args.config, args.overrides)  # bad keys fail here, before any launch
    launching = bool(args.nproc) and discover().world_size == 1
    if launching:  # the layout and batch split first: the config alone decides them
        from hybridflow_mg.commands.config import layout_of
        from hybridflow_mg.trainer.bootstrap import finished
        from hybridflow_mg.trainer.config import check_batch_split

        check_batch_split(cfg, layout_of(cfg, args.nproc).dp)
        done = finished(cfg)
        if done:  # nothing to launch, and no data to read
            print(done)
            return 0
    preflight(cfg, launching=launching)
    if launching:
        from hybridflow_mg.parallel.local_launch import launch_local, without_nproc

        return launch_local(args.nproc, without_nproc(args.argv))
    from hybridflow_mg.parallel.local_launch import EXIT_RESUMABLE
    from hybridflow_mg.trainer.trainer import Trainer

    trainer = Trainer(cfg)
    trainer.fit()
    return EXIT_RESUMABLE if trainer.preempted else 0

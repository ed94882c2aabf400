"""`hybridflow-mg bench reshard`: our resharder against the per-tensor baseline, same layout and model, one run.

Launches `torchrun --standalone --nproc-per-node N` on `benchmarks/reshard.py` (it lives in the source
checkout), or runs it in this process when already started by a launcher (torchrun, srun, mpirun).
Prints a table and writes JSON (default `benchmarks/results/reshard_<device>_<layout>_<date>.json`).

    hybridflow-mg bench reshard --nproc 8 --train tp=2,pp=2 --gen tp=2
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from hybridflow_mg.commands._args import parse_sizes

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "reshard.py"
MODEL_AXIS = 8
"""The benchmark model has 8 heads, 8 KV heads and 8 layers: tp, gen tp and pp must divide 8."""

# The benchmark's own options, forwarded as they are (benchmarks/reshard.py parses the same table).
RESHARD_OPTIONS: tuple[tuple[str, dict], ...] = (
    ("--train", dict(required=True, metavar="tp=T,pp=P[,vpp=V]", help="training layout")),
    ("--gen", dict(required=True, metavar="tp=TG", help="generation layout (pp=1)")),
    ("--model-mb", dict(type=float, default=50.0, help="smallest model size in fp32 MB (10^6 bytes); default 50")),
    ("--repeats", dict(type=int, default=5, help="timed rounds after one warm-up; the median is reported")),
    ("--bucket-mb", dict(type=float, default=64.0, help="resharder bucket size in MB; default 64")),
    ("--seed", dict(type=int, default=0, help="seed of the random model")),
    ("--out", dict(default=None, help="JSON path (default benchmarks/results/reshard_<device>_<layout>_<date>.json)")),
)


def add_reshard_arguments(p: argparse.ArgumentParser) -> None:
    for flag, kwargs in RESHARD_OPTIONS:
        p.add_argument(flag, **kwargs)


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: reshard (ours vs the per-tensor baseline)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    benches = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    r = benches.add_parser("reshard", help="resharder vs per-tensor gather+broadcast, on N CPU/GPU ranks",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--nproc", type=int, help="ranks to launch (leave out when already under a launcher)")
    add_reshard_arguments(r)
    r.set_defaults(run=run)


def forwarded(args) -> list[str]:
    """The benchmark's command line from parsed options."""
    argv = []
    for flag, _ in RESHARD_OPTIONS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            argv += [flag, str(value)]
    return argv


def check(args, world: int) -> None:
    """One-line ValueErrors before anything is launched: the layout over `world` ranks and the model."""
    from hybridflow_mg.parallel.layout import ParallelLayout

    t = parse_sizes(args.train, ("tp", "pp", "vpp"), "--train")
    g = parse_sizes(args.gen, ("tp",), "--gen")
    ParallelLayout.create(world=world, tp=t.get("tp", 1), pp=t.get("pp", 1), vpp=t.get("vpp", 1), gen_tp=g.get("tp"))
    for name, size in (("--train tp", t.get("tp", 1)), ("--train pp·vpp", t.get("pp", 1) * t.get("vpp", 1)),
                       ("--gen tp", g.get("tp", t.get("tp", 1)))):
        if MODEL_AXIS % size:
            raise ValueError(f"{name}={size} must divide {MODEL_AXIS} (the benchmark model has 8 heads, "
                             f"8 KV heads and 8 layers)")
    if args.repeats < 1 or args.model_mb <= 0 or args.bucket_mb <= 0:
        raise ValueError("--repeats must be at least 1; --model-mb and --bucket-mb must be positive")


def run(args) -> int:
    from hybridflow_mg.parallel.launch import discover

    if not SCRIPT.is_file():
        raise FileNotFoundError(f"{SCRIPT} is missing; run the benchmark from a source checkout (pip install -e .)")
    info = discover()
    if info.launcher != "single":  # already one of N ranks: run here
        if args.nproc is not None and args.nproc != info.world_size:
            raise ValueError(f"--nproc {args.nproc} but the launcher started {info.world_size} ranks")
        check(args, info.world_size)
        import importlib.util

        spec = importlib.util.spec_from_file_location("hybridflow_bench_reshard", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.main(forwarded(args))
    if args.nproc is None or args.nproc < 1:
        raise ValueError("give --nproc N (ranks to launch), or start this command under torchrun/srun/mpirun")
    check(args, args.nproc)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           str(SCRIPT), *forwarded(args)]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # one compute thread per rank: ranks share the cores
    return subprocess.run(cmd, env=env).returncode

"""`hybridflow-mg bench reshard`: the per-tensor baseline, our serial and our overlapped resharder, one run.
(`bench step`, `bench rollout` and `bench train`: see STEP_DOC below and hybridflow_mg/bench/.)

Launches `torchrun --standalone --nproc-per-node N` on `benchmarks/reshard.py` (it lives in the source
checkout), or runs it in this process when already started by a launcher (torchrun, srun, mpirun).
Every model depth of --layers and bucket size of --bucket-mb is measured in the same run (the sweep
reports speed against peak extra memory). Prints tables and writes JSON (default
`benchmarks/results/reshard_<device>_<layout>_<date>.json`).

    hybridflow-mg bench reshard --nproc 8 --train tp=2,pp=2 --gen tp=2
    hybridflow-mg bench reshard --nproc 4 --train tp=2,pp=2 --gen tp=1 --layers 8,16 --bucket-mb 4,16,64
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

from hybridflow_mg.commands._args import parse_sizes

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "reshard.py"
MODEL_AXIS = 8
"""The benchmark model has 8 heads and 8 KV heads: tp and gen tp must divide 8 (pp·vpp each depth)."""

# The benchmark's own options, forwarded as they are (benchmarks/reshard.py parses the same table).
RESHARD_OPTIONS: tuple[tuple[str, dict], ...] = (
    ("--train", dict(required=True, metavar="tp=T,pp=P[,vpp=V]", help="training layout")),
    ("--gen", dict(required=True, metavar="tp=TG", help="generation layout (pp=1)")),
    ("--model-mb", dict(type=float, default=50.0, help="smallest size in fp32 MB (10^6 bytes) of the first depth's "
                                                        "model; deeper ones keep its width. Default 50")),
    ("--layers", dict(default="8,16", metavar="L1,L2,...", help="model depths, each measured in this run; "
                                                               "default 8,16")),
    ("--repeats", dict(type=int, default=5, help="timed rounds after one warm-up; the median is reported")),
    ("--bucket-mb", dict(default="64,8", metavar="B1,B2,...", help="resharder bucket sizes in MB, each measured "
                                                                  "(serial and overlapped); default 64,8")),
    ("--seed", dict(type=int, default=0, help="seed of the random model")),
    ("--out", dict(default=None, help="JSON path (default benchmarks/results/reshard_<device>_<layout>_<date>.json)")),
)


STEP_DOC = """`hybridflow-mg bench step|rollout|train CONFIG [key=value ...] --nproc N --steps S`: throughput of the RL step.

step: S RL steps after --warmup unmeasured ones, through the Trainer as `train` runs them (a supervised
warm start in the config runs first, unmeasured: shorten it with actor.warm_start.steps=K): seconds,
tokens/s per rank and peak memory per stage, the actor update's model FLOPs and MFU against a GEMM of its
shapes timed in the same run (and the datasheet peak on GPU), reshard bytes and collectives.
rollout: generation alone (batch, lengths, tokens/s). train: the actor update alone on synthetic batches.
One JSON per run (schema: hybridflow_mg/bench/step.py), default under benchmarks/results/.

    hybridflow-mg bench step configs/quickstart.yaml --nproc 4 --steps 3 actor.warm_start.steps=20
    hybridflow-mg bench rollout configs/quickstart.yaml --nproc 4 data.prompts_per_step=64
    hybridflow-mg bench train configs/quickstart.yaml --nproc 4 --response-len 32
"""


def add_reshard_arguments(p: argparse.ArgumentParser) -> None:
    for flag, kwargs in RESHARD_OPTIONS:
        p.add_argument(flag, **kwargs)


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: step, rollout, train (the RL step and its parts), reshard",
                       description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    benches = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    r = benches.add_parser("reshard", help="resharder (serial, overlapped) vs per-tensor gather+broadcast, on N "
                                           "CPU/GPU ranks",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--nproc", type=int, help="ranks to launch (leave out when already under a launcher)")
    add_reshard_arguments(r)
    r.set_defaults(run=run)
    for name, help_ in (("step", "whole RL steps: seconds, tokens/s and peak memory per stage, actor-update MFU, "
                                 "reshard bytes"),
                        ("rollout", "generation alone at the config's layout: batch, lengths, tokens/s"),
                        ("train", "the actor update alone on synthetic batches: tokens/s, MFU")):
        b = benches.add_parser(name, help=help_, description=STEP_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
        b.add_argument("config", help="YAML preset, e.g. configs/quickstart.yaml")
        b.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. actor.warm_start.steps=20")
        b.add_argument("--nproc", type=int, help="ranks to launch (leave out when already under a launcher)")
        b.add_argument("--steps", type=int, default=3, help="measured steps (rounds) after the warm-up; default 3")
        b.add_argument("--warmup", type=int, default=1, help="unmeasured steps first; default 1")
        b.add_argument("--out", default=None, help=f"JSON path (default benchmarks/results/bench_{name}_<device>_"
                                                   "<config>_<date>.json)")
        if name == "train":
            b.add_argument("--prompt-len", type=int, default=16, help="prompt tokens of each synthetic sample")
            b.add_argument("--response-len", type=int, default=None,
                           help="response tokens of each synthetic sample (default rollout.max_new_tokens)")
        b.add_argument("--run-root", default=None, help=argparse.SUPPRESS)  # the launcher's shared run directory
        b.set_defaults(run=run_steps)
    add_suite_parsers(benches)


SUITE_DOC = """`hybridflow-mg bench scale|report|all`: growth exponents, charts and the whole suite.

scale: reshard time and bytes against depth (--layers) and world size (--worlds; layout train tp=2,
pp=W/2 → gen tp=1), and step time against samples per step (--prompts × rollout.n); each sweep fits
log y = a + b·log x and prints b with its points. report: PNG charts (stage breakdown, scaling curves,
ours next to TRL, the bucket sweep) and the table of benchmarks/results/README.md, from JSON files or
folders (default: the newest of each benchmark in benchmarks/results/). all: step, the TRL peer,
reshard, scale and report into one folder (settings: hybridflow_mg/bench/suite.py).

    hybridflow-mg bench scale --worlds 2,4,8 --layers 8,16,32 --prompts 8,16,32
    hybridflow-mg bench report benchmarks/results/all_cpu_2026-12-01
    hybridflow-mg bench all --quick
"""


def add_suite_parsers(benches) -> None:
    kw = dict(description=SUITE_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    sc = benches.add_parser("scale", help="growth exponents: reshard time and bytes vs depth and world size, step "
                                          "time vs samples per step", **kw)
    sc.add_argument("config", nargs="?", default="configs/quickstart.yaml", help="the step sweep's config")
    sc.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of every step run")
    for flag, default, help_ in (("--worlds", "2,4,8", "world sizes of the reshard sweep (even)"),
                                 ("--layers", "8,16,32", "model depths of the reshard sweep"),
                                 ("--prompts", "8,16,32", "data.prompts_per_step of each step run")):
        sc.add_argument(flag, default=default, help=f"{help_}; default {default}")
    sc.add_argument("--model-mb", type=float, default=20.0, help="fp32 MB of the first depth's model; default 20")
    sc.add_argument("--bucket-mb", type=float, default=4.0, help="resharder bucket size in MB; default 4")
    sc.add_argument("--repeats", type=int, default=5, help="timed reshard rounds (median); default 5")
    sc.add_argument("--nproc", type=int, default=4, help="ranks of each step run; default 4")
    sc.add_argument("--steps", type=int, default=2, help="measured steps per step run; default 2")
    sc.add_argument("--warmup", type=int, default=1, help="unmeasured steps first; default 1")
    sc.add_argument("--warm-start-steps", type=int, default=0, help="actor.warm_start.steps of each step run; default 0")
    sc.add_argument("--only", choices=("reshard", "step"), help="run one of the two sweeps")
    sc.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_scale_<device>_<date>.json); "
                                                "each point's JSON goes into the folder of the same name")
    sc.set_defaults(run=run_scale)
    rp = benches.add_parser("report", help="PNG charts and the results table of benchmark JSONs", **kw)
    rp.add_argument("inputs", nargs="*", metavar="JSON_OR_DIR", help="benchmark JSONs or folders (default: "
                                                                     "benchmarks/results/)")
    rp.add_argument("--out-dir", default=None, help="charts and table.md (default reports/bench_<date>)")
    rp.add_argument("--readme", default=None, help="README whose marked table is regenerated (default "
                                                   "benchmarks/results/README.md)")
    rp.add_argument("--no-readme", action="store_true", help="leave every README alone")
    rp.set_defaults(run=run_report)
    al = benches.add_parser("all", help="step, the TRL peer, reshard, scale and report into one results folder", **kw)
    al.add_argument("config", nargs="?", default="configs/quickstart.yaml", help="the step's config")
    al.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of the step (and the peer)")
    al.add_argument("--quick", action="store_true", help="small settings, under 10 minutes on an idle 2-core machine")
    al.add_argument("--out-dir", default=None, help="results folder (default benchmarks/results/all_<device>_<date>)")
    al.set_defaults(run=run_all)


def forwarded(args) -> list[str]:
    """The benchmark's command line from parsed options."""
    argv = []
    for flag, _ in RESHARD_OPTIONS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            argv += [flag, str(value)]
    return argv


def number_list(text: str, flag: str, kind: type = float) -> list:
    """'4,16,64' → [4.0, 16.0, 64.0] (or ints), each positive; else a one-line ValueError naming `flag`."""
    try:
        values = [kind(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(not 0 < v < math.inf for v in values):
        noun = "positive integers" if kind is int else "positive numbers"
        raise ValueError(f"{flag} must be a comma list of {noun}, got {text!r}")
    return values


def check(args, world: int) -> None:
    """One-line ValueErrors before anything is launched: the layout over `world` ranks and the model."""
    from hybridflow_mg.parallel.layout import ParallelLayout

    t = parse_sizes(args.train, ("tp", "pp", "vpp"), "--train")
    g = parse_sizes(args.gen, ("tp",), "--gen")
    ParallelLayout.create(world=world, tp=t.get("tp", 1), pp=t.get("pp", 1), vpp=t.get("vpp", 1), gen_tp=g.get("tp"))
    for name, size in (("--train tp", t.get("tp", 1)), ("--gen tp", g.get("tp", t.get("tp", 1)))):
        if MODEL_AXIS % size:
            raise ValueError(f"{name}={size} must divide {MODEL_AXIS} (the benchmark model has 8 heads and "
                             f"8 KV heads)")
    stages = t.get("pp", 1) * t.get("vpp", 1)
    for layers in number_list(args.layers, "--layers", int):
        if layers % stages:
            raise ValueError(f"--train pp·vpp={stages} must divide every depth of --layers, not {layers}")
    number_list(args.bucket_mb, "--bucket-mb")
    if args.repeats < 1 or args.model_mb <= 0:
        raise ValueError("--repeats must be at least 1; --model-mb must be positive")


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


def run_steps(args) -> int:
    """bench step / rollout / train: launch --nproc ranks (as `train --nproc` does), or run on this rank."""
    import tempfile

    from hybridflow_mg.commands.config import layout_of
    from hybridflow_mg.commands.train import preflight
    from hybridflow_mg.config.load import load_config
    from hybridflow_mg.parallel.launch import discover
    from hybridflow_mg.trainer.config import TrainConfig, check_batch_split

    if args.steps < 1 or args.warmup < 0:
        raise ValueError(f"--steps must be at least 1 and --warmup at least 0, got {args.steps} and {args.warmup}")
    if args.nproc is not None and args.nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {args.nproc}")
    from hybridflow_mg.bench.step import bench_overrides

    launching = bool(args.nproc) and discover().world_size == 1
    root = args.run_root or (tempfile.mkdtemp(prefix="hybridflow_bench_") if launching else None)
    cfg = load_config(TrainConfig, args.config, [*args.overrides, *bench_overrides(root)])
    if launching:
        from hybridflow_mg.parallel.local_launch import launch_local, without_nproc

        check_batch_split(cfg, layout_of(cfg, args.nproc).dp)
        preflight(cfg, launching=True)
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # as launch/quickstart.sh runs it: ranks share the cores
        try:
            return launch_local(args.nproc, [*without_nproc(args.argv), "--run-root", root])
        finally:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
    common = dict(steps=args.steps, warmup=args.warmup, config_path=args.config, overrides=list(args.overrides),
                  out=args.out)
    if args.bench == "step":
        from hybridflow_mg.bench.step import run_step

        run_step(cfg, **common)
    elif args.bench == "rollout":
        from hybridflow_mg.bench.parts import run_rollout

        run_rollout(cfg, **common)
    else:
        from hybridflow_mg.bench.parts import run_train

        run_train(cfg, **common, prompt_len=args.prompt_len, response_len=args.response_len)
    return 0


def run_scale(args) -> int:
    import json

    from hybridflow_mg.bench.scale import ScaleSettings, run_scale as sweep, sweep_table
    from hybridflow_mg.bench.suite import default_out_dir

    settings = ScaleSettings(config=args.config, overrides=list(args.overrides),
                             worlds=number_list(args.worlds, "--worlds", int), layers=number_list(args.layers, "--layers", int),
                             model_mb=args.model_mb, bucket_mb=args.bucket_mb, repeats=args.repeats,
                             prompts_per_step=number_list(args.prompts, "--prompts", int), nproc=args.nproc,
                             steps=args.steps, warmup=args.warmup, warm_start_steps=args.warm_start_steps)
    out = Path(args.out or default_out_dir("bench_scale").with_suffix(".json"))
    report = sweep(settings, out.with_suffix(""), reshard=args.only != "step", step=args.only != "reshard")
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(sweep_table(report))
    print(f"wrote {out} (points in {out.with_suffix('')})")
    return 1 if any(r["status"] for r in report["runs"]) else 0


def run_report(args) -> int:
    import datetime as dt

    from hybridflow_mg.bench.report import RESULTS, write_report

    out_dir = Path(args.out_dir or f"reports/bench_{dt.date.today().isoformat()}")
    readme = None if args.no_readme else Path(args.readme) if args.readme else RESULTS / "README.md"
    files = write_report(args.inputs, out_dir, readme)
    print("\nbench report: " + ", ".join(str(f) for f in files))
    return 0


def run_all(args) -> int:
    from hybridflow_mg.bench.suite import SuiteSettings, default_out_dir, run_all as suite

    settings = (SuiteSettings.quick(args.config, list(args.overrides)) if args.quick
                else SuiteSettings(config=args.config, overrides=list(args.overrides)))
    settings.scale.config, settings.scale.overrides = args.config, list(args.overrides)
    return suite(settings, Path(args.out_dir) if args.out_dir else default_out_dir())

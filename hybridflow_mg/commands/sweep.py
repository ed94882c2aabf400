"""`hybridflow-mg sweep CONFIG --seeds K [key=value ...]`: train CONFIG K times with different seeds, evaluate
each final checkpoint greedily on the same validation prompts, and write the final validation metrics as
mean ± std over seeds and how consistently the runs answer each prompt (OUT/sweep.json, OUT/sweep.md).

Seed s runs as `<run.name>_seed<s>` with run.seed and rollout.seed raised by s; each run is a `train
--nproc N` job, one after another. `--parallel P` runs P at once, on GPUs each on its own N devices;
it stays 1 by default because on a CPU machine every run's ranks already use all cores, so runs side
by side only share them. Details: hybridflow_mg/evaluation/sweep.py.
"""
from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("sweep", help="train a config with K seeds: final metrics as mean ± std, answer consistency",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML preset, e.g. configs/quickstart.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides for every run")
    p.add_argument("--seeds", type=int, required=True, metavar="K", help="number of runs (at least 2)")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes per run (default: the training layout's smallest world, tp × pp × dp; "
                        "the quickstart runs on 4)")
    p.add_argument("--parallel", type=int, default=1, metavar="P", help="runs at once (default 1; see above)")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="prompts the final checkpoints are evaluated on (default: the config's validation file)")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default: <output_dir>/<name>_sweep)")
    p.set_defaults(run=run)


def run(args) -> int:
    import signal
    import sys

    from hybridflow_mg.evaluation.sweep import CHILDREN, SweepStopped, plan_sweep, run_seeds, write_sweep
    from hybridflow_mg.parallel.local_launch import EXIT_RESUMABLE

    plan = plan_sweep(args.config, args.overrides, num_seeds=args.seeds, nproc=args.nproc, parallel=args.parallel,
                      out=args.out, data=args.data)
    # a SIGTERM to the sweep stops its runs too (each saves a checkpoint; the same command resumes them)
    CHILDREN.stopped_by = None  # a sweep stopped earlier in this process does not stop this one
    signal.signal(signal.SIGTERM, CHILDREN.forward)
    try:
        rows = run_seeds(plan)
    except SweepStopped as e:
        print(f"hybridflow-mg: {e}", file=sys.stderr, flush=True)
        return EXIT_RESUMABLE
    summary = write_sweep(plan, rows)
    c = summary["consistency"]
    print(f"sweep of {len(plan.runs)} seeds: answers agree on {c['agreement']:.3f} of {c['num_prompts']} prompts "
          f"(pairwise {c['pairwise_agreement']:.3f}), per-prompt reward std {c['reward_std']:.3f}; wrote "
          f"{plan.out / 'sweep.json'} and {plan.out / 'sweep.md'}")
    return 0

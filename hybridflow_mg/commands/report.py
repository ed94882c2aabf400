"""`hybridflow-mg report RUN_DIR [RUN_DIR ...]`: PNG charts and a markdown table of one run or several side by
side (A/B), from each run's metrics.jsonl: reward and validation curves; KL, entropy, response length, truncation,
throughput and the critic's value loss; stage times; the final metrics. No processes, no model: it reads the files a run wrote.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="PNG charts and a markdown table of one or more runs (A/B)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories holding metrics.jsonl, e.g. runs/quickstart")
    p.add_argument("--out", type=Path, help="output directory (default: reports/<date>_<run names>)")
    p.add_argument("--smooth", type=int, default=10, metavar="N",
                   help="per-step curves are drawn raw (faint) and as the mean of the last N steps (default 10; 1: raw only)")
    p.set_defaults(run=run)


def run(args) -> int:
    from hybridflow_mg.metrics.report import default_out, load_runs, write_report

    if args.smooth < 1:
        raise ValueError(f"report: --smooth must be at least 1 (got {args.smooth})")
    runs = load_runs(args.runs)
    out = args.out or default_out(runs)
    files = write_report(runs, out, window=args.smooth)
    print(f"report of {len(runs)} run{'s' * (len(runs) > 1)} in {out}: " + ", ".join(f.name for f in files))
    return 0

"""`hybridflow-mg eval MODEL --data FILE`: accuracy, pass@k, maj@k, lengths, truncation, diversity, a
per-data_source breakdown and KL to a reference, from samples drawn through the in-process vLLM path.

MODEL is an HF model directory or one of our checkpoints (e.g. runs/NAME/checkpoints/final, evaluated
at the layout it was saved at unless --train says otherwise). FILE holds prompts in verl's schema, as
training reads them (parquet or jsonl: prompt, reward_model.ground_truth, data_source); each sample is
scored by the rule reward its data_source picks. Writes --out FILE (JSON: config, model, data, date,
metrics) and FILE.samples.jsonl (every sample). `--nproc N` starts N local processes; under a
launcher (torchrun, srun, mpirun) the command runs as is. Details: hybridflow_mg/evaluation/run.py.
"""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model or checkpoint on a prompt file (accuracy, pass@k, maj@k, ...)",
                       description=__doc__)
    p.add_argument("model", metavar="MODEL", help="HF model directory or hybridflow_mg checkpoint directory")
    p.add_argument("--data", required=True, help="prompt file (.parquet or .jsonl, verl schema)")
    p.add_argument("--n", type=int, default=1, help="samples per prompt: pass@k and maj@k for k = 1, 2, 4, …, n")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (default: 0, greedy, for --n 1; 1.0 for --n > 1)")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per sample (more: truncated)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", default=None, metavar="tp=T,pp=P",
                   help="Megatron layout the weights load into (default: a checkpoint's saved layout; tp=1,pp=1)")
    p.add_argument("--gen", default="", metavar="tp=TG[,pp=PG]",
                   help="vLLM generation tp (default: training tp) and pipeline stages (default 1)")
    p.add_argument("--nproc", type=int, default=None, help="start this many local processes (parallel/local_launch.py)")
    p.add_argument("--ref", default=None, metavar="MODEL",
                   help="reference model (HF or checkpoint, same architecture): report the KL to it")
    p.add_argument("--reward", default=None, metavar="NAME",
                   help="score every sample with this reward (registered name or path/to/file.py:fn); default: "
                        "by data_source, as training does")
    p.add_argument("--prompt-key", default="prompt", help="the data file's prompt column")
    p.add_argument("--kv-cache-mb", type=int, default=None,
                   help="vLLM KV-cache size per rank in MiB (default on CPU: 256; on GPU vLLM decides)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--out", default=None, help="JSON file to write (and OUT.samples.jsonl); default: JSON on stdout")
    p.set_defaults(run=run)


def run(args) -> int:
    from hybridflow_mg.evaluation.inputs import check_inputs
    from hybridflow_mg.parallel.launch import discover

    inputs = check_inputs(args)  # before any worker or engine: bad input costs a second, not a startup
    if args.nproc and discover().world_size == 1:
        from hybridflow_mg.parallel.local_launch import launch_local, without_nproc

        return launch_local(args.nproc, without_nproc(args.argv))
    from hybridflow_mg.evaluation.run import evaluate

    return evaluate(args, inputs)

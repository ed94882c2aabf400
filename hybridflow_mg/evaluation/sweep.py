"""`hybridflow-mg sweep CONFIG --seeds K`: one config trained K times with different seeds, each final
checkpoint evaluated greedily on the same validation prompts, and the spread between the runs.

    plan = plan_sweep(config, overrides, ...)   # every seed's config loaded and checked, nothing started
    results = run_seeds(plan, runner)           # per seed: `train --nproc N`, then `eval` of checkpoints/final
    write_sweep(plan, results)                  # OUT/sweep.json and OUT/sweep.md

Seed s (0 … K−1) is the config with `run.name=<name>_seed<s>`, `run.seed=<run.seed + s>` and
`rollout.seed=<rollout.seed + s>` (and `data.seed` likewise when the config fixes it), so seed 0 is the
config itself under another name. A synthetic config also gets `model.synthetic.seed=<run.seed>`: its
problems (and tokenizer) stay those of seed 0, so every run trains and validates on the same prompts
and the runs differ in initialisation, data order and sampling only.

Each run is a child process of this CLI (`train CONFIG ... --nproc N`, the local launcher's job), its
output in OUT/logs/seed<s>.train.log. A seed whose run already finished (`trainer.resume=auto` finds
its final checkpoint) is not trained again, so a sweep that stopped continues where it stopped. Its
final checkpoint is then evaluated by `eval ... --n 1 --temperature 0` (greedy, one answer per prompt,
at the config's layouts and `rollout.max_new_tokens`) into OUT/seed<s>.eval.json and its samples file.

What the sweep reports (means and standard deviations over runs; std is the sample std, K − 1 in the
denominator):

- the final validation metrics: the last validation row of each run's metrics.jsonl (`val_reward`,
  `val/...`: the policy before the last update) and the eval of the final checkpoint (`eval/...`:
  after it), as mean ± std and per seed;
- consistency over the validation prompts (`consistency`): `agreement`, the share of prompts on
  which all K runs' greedy answers are equal; `pairwise_agreement`, the share of equal answers over
  every pair of runs, averaged over prompts (for K = 2 the two are the same); `reward_std`, the std of
  a prompt's reward over the runs, averaged over prompts. Answers are the eval's extracted answers
  (`answers.answer_of`); a missing answer (None) equals nothing, not even another missing one.

A failed run stops the sweep with one line naming the seed, its status, its log and what was
written before it; no sweep.json is written then. A SIGTERM to the sweep is passed to its running child
(`Children`): a training job saves a checkpoint and stops, no further child starts, and the sweep
exits 75 (`SweepStopped`); the same command resumes. Logs are appended to, so a resumed seed's log
keeps its first part. On CPU each child gets `OMP_NUM_THREADS=1` unless set (one compute thread per
rank, as `launch/quickstart.sh` runs the quickstart: its ranks share the cores).
"""
from __future__ import annotations

import datetime
import itertools
import json
import math
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from hybridflow_mg.utils.files import write_text_atomic

EVAL_SKIPPED = ("num_prompts", "num_samples", "pass@1", "maj@1")
"""Eval keys left out of the table: counts, and pass@1 / maj@1, which equal accuracy at one greedy sample."""


class SweepError(Exception):
    """A run of the sweep failed; the message says which and what was written (one line, status 1)."""

    plain = True  # cli._fail prints the message as it is


# --- pure: consistency and aggregation --------------------------------------------------------------------------


def sample_std(values: Sequence[float]) -> float:
    """The sample standard deviation (K − 1 in the denominator); 0.0 for fewer than two values."""
    if len(values) < 2:
        return 0.0
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def consistency(answers: Sequence[Sequence[str | None]], rewards: Sequence[Sequence[float]]) -> dict[str, float]:
    """How alike K ≥ 2 runs answer the same P prompts: `answers[r][p]` and `rewards[r][p]` are run r's
    greedy answer to prompt p and its reward. Returns num_runs, num_prompts, agreement (share of
    prompts where all K answers are equal and none is missing), pairwise_agreement (share of equal,
    present answers over the K(K−1)/2 pairs of runs, mean over prompts) and reward_std (the sample std
    over runs of a prompt's reward, mean over prompts)."""
    num_runs = len(answers)
    if num_runs < 2 or len(rewards) != num_runs:
        raise ValueError(f"consistency needs the answers and rewards of at least 2 runs, got {num_runs} and "
                         f"{len(rewards)}")
    num_prompts = len(answers[0])
    if num_prompts == 0 or any(len(a) != num_prompts for a in answers) or any(len(r) != num_prompts for r in rewards):
        raise ValueError("every run needs an answer and a reward for each of the same prompts (and at least one)")
    agree = pairwise = spread = 0.0
    pairs = list(itertools.combinations(range(num_runs), 2))
    for p in range(num_prompts):
        given = [answers[r][p] for r in range(num_runs)]
        agree += float(given[0] is not None and all(a == given[0] for a in given))
        pairwise += sum(given[i] is not None and given[i] == given[j] for i, j in pairs) / len(pairs)
        spread += sample_std([rewards[r][p] for r in range(num_runs)])
    return {"num_runs": num_runs, "num_prompts": num_prompts, "agreement": agree / num_prompts,
            "pairwise_agreement": pairwise / num_prompts, "reward_std": spread / num_prompts}


def mean_std(per_run: Sequence[Mapping[str, float]]) -> dict[str, dict[str, Any]]:
    """{metric: {mean, std (sample), values (per run, in run order)}} for each metric every run has, in
    the first run's key order."""
    keys = [k for k in per_run[0] if all(k in m for m in per_run[1:])] if per_run else []
    out = {}
    for k in keys:
        values = [float(m[k]) for m in per_run]
        out[k] = {"mean": sum(values) / len(values), "std": sample_std(values), "values": values}
    return out


def aligned(runs: Sequence[Sequence[Mapping[str, Any]]]) -> tuple[list[list[str | None]], list[list[float]]]:
    """(answers[r][p], rewards[r][p]) from each run's samples-file records (one greedy sample per
    prompt), prompts in row order; a ValueError when the runs did not answer the same prompts."""
    by_run = [{rec["prompt_index"]: rec for rec in records} for records in runs]
    rows = sorted(by_run[0])
    for r, recs in enumerate(by_run[1:], 1):
        if sorted(recs) != rows:
            raise ValueError(f"run {r} answered other prompt rows than run 0 ({len(recs)} against {len(rows)})")
        for p in rows:
            if (recs[p]["prompt"], recs[p]["ground_truth"]) != (by_run[0][p]["prompt"], by_run[0][p]["ground_truth"]):
                raise ValueError(f"run {r} and run 0 were evaluated on different prompts (row {p} differs); "
                                 "the sweep compares answers to the same prompts")
    return ([[recs[p]["answer"] for p in rows] for recs in by_run],
            [[float(recs[p]["reward"]) for p in rows] for recs in by_run])


def final_val_metrics(metrics_file: Path) -> tuple[int | None, dict[str, float]]:
    """(step, {val_reward, val/...}) of the last metrics.jsonl row with a validation, numbers only;
    (None, {}) when the run logged none. A cut-off last line is skipped."""
    step, found = None, {}
    for line in metrics_file.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "val_reward" in row:
            step = row.get("step")
            found = {k: float(v) for k, v in row.items() if (k == "val_reward" or k.startswith("val/"))
                     and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return step, found


def eval_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """The eval JSON's scalar metrics as `eval/<key>` (see EVAL_SKIPPED)."""
    return {f"eval/{k}": float(v) for k, v in report["metrics"].items()
            if k not in EVAL_SKIPPED and isinstance(v, (int, float)) and not isinstance(v, bool)}


# --- the plan: what each seed runs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeedRun:
    """One seed of the sweep: its overrides, where it writes, and where its eval goes."""

    index: int
    """s in 0 … K−1."""
    seed: int
    """Its run.seed."""
    run_dir: Path
    overrides: list[str]
    """The user's overrides followed by this seed's."""
    eval_json: Path
    val_file: Path
    """The prompts its final checkpoint is evaluated on."""

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "checkpoints" / "final"

    @property
    def samples(self) -> Path:
        return Path(str(self.eval_json) + ".samples.jsonl")


@dataclass(frozen=True)
class SweepPlan:
    config: str
    overrides: list[str]
    name: str
    out: Path
    nproc: int
    parallel: int
    runs: list[SeedRun]
    eval_args: list[str] = field(default_factory=list)
    """eval's options besides MODEL, --data and --out (the same for every seed)."""


def plan_sweep(config: str, overrides: Sequence[str], *, num_seeds: int, nproc: int | None = None,
               parallel: int = 1, out: str | None = None, data: str | None = None) -> SweepPlan:
    """Every seed's config loaded and checked (keys, seed ranges, the layout against `nproc`), nothing
    started or written. One-line ValueErrors for bad input."""
    from hybridflow_mg.commands.config import layout_of
    from hybridflow_mg.config.load import load_config
    from hybridflow_mg.trainer.bootstrap import run_dir, synthetic_paths
    from hybridflow_mg.trainer.config import TrainConfig, check_batch_split

    if isinstance(num_seeds, bool) or not isinstance(num_seeds, int) or num_seeds < 2:
        raise ValueError(f"--seeds must be at least 2, got {num_seeds}: the consistency of answers compares runs")
    for flag, value in (("--nproc", nproc), ("--parallel", parallel)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    base = load_config(TrainConfig, config, list(overrides))
    t, g = base.parallel.train, base.parallel.gen
    nproc = nproc or t.tp * t.pp * (t.dp or 1)  # the smallest world of the training layout
    check_batch_split(base, layout_of(base, nproc).dp)
    out_dir = Path(out) if out else Path(base.run.output_dir) / f"{base.run.name}_sweep"
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {str(out_dir)!r} is a file; give a directory for sweep.json, sweep.md and the logs")
    if data is not None and not Path(data).is_file():
        raise FileNotFoundError(f"--data {data!r} does not exist; give the validation prompts (.parquet or .jsonl)")
    if data is None and base.model.synthetic is None and len(base.data.val_files) != 1:
        raise ValueError(f"sweep evaluates every run on one prompt file and data.val_files has "
                         f"{len(base.data.val_files)}; name it with --data FILE")
    _check_gpus(nproc, parallel)
    if not base.trainer.save_final:
        raise ValueError("trainer.save_final=false leaves no final checkpoint for the sweep to evaluate; drop the "
                         "override")
    if "jsonl" not in base.run.loggers:
        raise ValueError(f"run.loggers={base.run.loggers} has no jsonl: the sweep reads each run's metrics.jsonl; "
                         "add jsonl")
    runs = []
    for s in range(num_seeds):
        mine = [f"run.name={base.run.name}_seed{s}", f"run.seed={base.run.seed + s}",
                f"rollout.seed={base.rollout.seed + s}"]
        if base.data.seed is not None:
            mine.append(f"data.seed={base.data.seed + s}")
        if base.model.synthetic is not None:
            fixed = base.model.synthetic.seed if base.model.synthetic.seed is not None else base.run.seed
            mine.append(f"model.synthetic.seed={fixed}")
        cfg = load_config(TrainConfig, config, [*overrides, *mine])  # a seed past a range: one line now
        val = data or (synthetic_paths(cfg).data.val_files[0] if cfg.model.synthetic else cfg.data.val_files[0])
        runs.append(SeedRun(index=s, seed=cfg.run.seed, run_dir=run_dir(cfg), overrides=[*overrides, *mine],
                            eval_json=out_dir / f"seed{s}.eval.json", val_file=Path(val)))
    gen_tp = g.tp or t.tp  # left out: the training tp, as train reads it
    eval_world = math.lcm(t.tp * t.pp, gen_tp * g.pp)  # the checkpoint's layout and the generation layout
    eval_args = ["--n", "1", "--temperature", "0", "--max-tokens", str(base.rollout.max_new_tokens),
                 "--nproc", str(eval_world), "--gen", f"tp={gen_tp},pp={g.pp}", "--dtype", base.model.dtype,
                 "--prompt-key", base.data.prompt_key]
    if isinstance(base.reward.fn, str):
        eval_args += ["--reward", base.reward.fn]
    return SweepPlan(config=config, overrides=list(overrides), name=base.run.name, out=out_dir, nproc=nproc,
                     parallel=parallel, runs=runs, eval_args=eval_args)


def _check_gpus(nproc: int, parallel: int) -> None:
    """Runs side by side need disjoint GPUs (each gets its own CUDA_VISIBLE_DEVICES slice)."""
    if parallel == 1:
        return
    import torch

    count = torch.cuda.device_count()
    if count and parallel * nproc > count:
        raise ValueError(f"--parallel {parallel} × --nproc {nproc} needs {parallel * nproc} GPUs and this machine "
                         f"has {count}; lower --parallel")


# --- running the seeds ------------------------------------------------------------------------------------------

Runner = Callable[[list[str], Path, dict[str, str]], int]
"""(hybridflow-mg argv, log file, environment) → exit status. The default starts a child process."""


class SweepStopped(SweepError):
    """A signal stopped the sweep (`Children.forward`); the same command resumes it (status 75)."""


class Children:
    """The sweep's running child processes, so that a signal to the sweep reaches them.

    A SIGTERM to the sweep alone (`kill`, a batch system ending it) would otherwise leave its training
    job running on, holding the machine: `forward` passes it on, the job saves a checkpoint and stops
    (exit 75), no further child starts, and the sweep ends with status 75; the same command resumes."""

    def __init__(self):
        self._running: set[subprocess.Popen] = set()
        self._lock = threading.RLock()  # reentrant: the handler may interrupt the main thread holding it
        self.stopped_by: int | None = None
        """The signal that stopped the sweep, once one did."""

    def run(self, cmd: list[str], log: Path, env: dict[str, str]) -> int:
        """`cmd` with stdout and stderr into `log`; its exit status. SweepStopped once a signal was
        forwarded (a child started in the meantime is passed the signal too)."""
        self.check()
        with open(log, "a") as f:  # a resumed seed's log keeps its first part
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
            with self._lock:
                self._running.add(proc)
                if self.stopped_by is not None:  # the signal came while it was starting
                    proc.send_signal(self.stopped_by)
            try:
                return proc.wait()
            finally:
                with self._lock:
                    self._running.discard(proc)

    def check(self) -> None:
        """Raise SweepStopped when a signal was forwarded."""
        if self.stopped_by is not None:
            import signal

            raise SweepStopped(f"stopped by {signal.Signals(self.stopped_by).name}")

    def forward(self, signum: int, frame=None) -> None:
        """Send `signum` to every running child and start no other (a `signal.signal` handler)."""
        with self._lock:
            self.stopped_by = signum
            for proc in self._running:
                proc.send_signal(signum)


CHILDREN = Children()
"""The children of this process's sweep (`commands/sweep.py` forwards SIGTERM to them)."""


def run_cli(argv: list[str], log: Path, env: dict[str, str]) -> int:
    """`hybridflow-mg <argv>` as a child process, stdout and stderr into `log`."""
    return CHILDREN.run([sys.executable, "-m", "hybridflow_mg.cli", *argv], log, env)


def _last_error(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.is_file() else []
    said = [ln for ln in lines if ln.startswith("hybridflow-mg: error:")]
    return (said or lines or ["(no output)"])[-1]


def _seed_job(plan: SweepPlan, run: SeedRun, runner: Runner, env: dict[str, str]) -> dict[str, Any]:
    """Train seed `run`, then evaluate its final checkpoint; its row of sweep.json. SweepError on failure."""
    logs = plan.out / "logs"
    stages = (("train", ["train", plan.config, *run.overrides, "--nproc", str(plan.nproc)]),
              ("eval", ["eval", str(run.checkpoint), "--data", str(run.val_file), *plan.eval_args,
                        "--out", str(run.eval_json)]))
    for stage, argv in stages:
        log = logs / f"seed{run.index}.{stage}.log"
        what = run.run_dir if stage == "train" else run.checkpoint
        print(f"sweep: seed {run.index} (run.seed={run.seed}): {stage} {what} (log {log})", flush=True)
        code = runner(argv, log, env)
        if code != 0:
            CHILDREN.check()  # stopped by a signal, not failed
            raise SweepError(f"seed {run.index} (run.seed={run.seed}, {run.run_dir}) failed in {stage} with status "
                             f"{code}: {_last_error(log)} (log: {log})")
    val_step, val = final_val_metrics(run.run_dir / "metrics.jsonl")
    report = json.loads(run.eval_json.read_text())
    return {"index": run.index, "seed": run.seed, "run_dir": str(run.run_dir), "checkpoint": str(run.checkpoint),
            "checkpoint_step": report.get("model_step"), "val_step": val_step, "eval_json": str(run.eval_json),
            "samples": str(run.samples), "metrics": {**val, **eval_metrics(report)}}


def run_seeds(plan: SweepPlan, runner: Runner | None = None) -> list[dict[str, Any]]:
    """Every seed's row, in seed order. `plan.parallel` lanes, each running its seeds one after another
    (lane j takes seeds j, j + P, …; on GPUs its own slice of CUDA_VISIBLE_DEVICES). The first failure
    starts no further seed; seeds already running finish. SweepError names the failed seed and what was
    written; SweepStopped (a subclass) when a forwarded signal stopped the sweep instead."""
    runner = runner or run_cli
    (plan.out / "logs").mkdir(parents=True, exist_ok=True)
    done: dict[int, dict[str, Any]] = {}
    failures: list[SweepError] = []
    lock = threading.Lock()

    def lane(j: int) -> None:
        env = dict(os.environ)
        if not _num_gpus():
            env.setdefault("OMP_NUM_THREADS", "1")  # as launch/quickstart.sh: the ranks share the CPU cores
        if plan.parallel > 1 and _num_gpus():
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in range(j * plan.nproc, (j + 1) * plan.nproc))
        for run in plan.runs[j::plan.parallel]:
            with lock:
                if failures:
                    return
            try:
                row = _seed_job(plan, run, runner, env)
            except SweepError as e:
                with lock:
                    failures.append(e)
                return
            with lock:
                done[run.index] = row

    if plan.parallel == 1:
        lane(0)
    else:
        threads = [threading.Thread(target=lane, args=(j,)) for j in range(plan.parallel)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    if failures:
        kept = "; ".join(f"seed {i}: {done[i]['run_dir']} and {done[i]['eval_json']}" for i in sorted(done))
        if all(isinstance(f, SweepStopped) for f in failures):  # a real failure in another lane is said as such
            raise SweepStopped(f"sweep: {failures[0]}; seeds finished: {kept or 'none'}; a training job that was "
                               "running saved a checkpoint and stopped; the same command resumes the sweep")
        raise SweepError(f"sweep: {failures[0]}. Finished before it: {kept or 'no seed'}; no sweep.json was written")
    return [done[r.index] for r in plan.runs]


def _num_gpus() -> int:
    import torch

    return torch.cuda.device_count()


# --- the report -------------------------------------------------------------------------------------------------


def summarize_sweep(plan: SweepPlan, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """sweep.json's content from the seeds' rows and their samples files."""
    records = [[json.loads(ln) for ln in Path(row["samples"]).read_text().splitlines() if ln.strip()] for row in rows]
    answers, rewards = aligned(records)
    return {"config": plan.config, "overrides": plan.overrides, "name": plan.name, "num_seeds": len(rows),
            "nproc": plan.nproc, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "std": "sample std over seeds (K - 1 in the denominator)",
            "metrics": mean_std([row["metrics"] for row in rows]),
            "consistency": consistency(answers, rewards), "runs": rows}


def markdown(summary: Mapping[str, Any]) -> str:
    """sweep.md: the mean ± std table with a column per seed, then the consistency."""
    runs = summary["runs"]
    c = summary["consistency"]
    head = " | ".join(f"seed {r['index']} (run.seed {r['seed']})" for r in runs)
    lines = [f"# Sweep of {summary['config']}: {summary['num_seeds']} seeds", "",
             f"Overrides: {' '.join(summary['overrides']) or 'none'}. Runs: "
             + ", ".join(f"`{r['run_dir']}`" for r in runs) + f"; {summary['nproc']} processes each.", "",
             "Final validation metrics: `val_reward` and `val/...` from each run's last validation (steps "
             + ", ".join(str(r["val_step"]) for r in runs) + ", each before that step's update); `eval/...` from a "
             "greedy eval of its final checkpoint. std: the sample std over seeds.", "",
             f"| metric | mean ± std | {head} |", "|---|---|" + "---|" * len(runs)]
    for key, m in summary["metrics"].items():
        per_seed = " | ".join(f"{v:.3g}" for v in m["values"])
        lines.append(f"| `{key}` | {m['mean']:.3g} ± {m['std']:.2g} | {per_seed} |")
    lines += ["", f"Consistency of the greedy answers on {c['num_prompts']} validation prompts:", "",
              "| all runs agree | pairwise agreement | per-prompt reward std (mean) |", "|---|---|---|",
              f"| {c['agreement']:.3f} | {c['pairwise_agreement']:.3f} | {c['reward_std']:.3f} |", ""]
    return "\n".join(lines)


def write_sweep(plan: SweepPlan, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """OUT/sweep.json and OUT/sweep.md, each written under a temporary name and renamed when complete."""
    summary = summarize_sweep(plan, rows)
    for name, text in (("sweep.json", json.dumps(summary, indent=1) + "\n"), ("sweep.md", markdown(summary))):
        write_text_atomic(plan.out / name, text)
    return summary

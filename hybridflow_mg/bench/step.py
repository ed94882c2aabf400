"""`bench step`: whole RL steps through the `Trainer`, per stage, and the JSON every step benchmark writes.

Every rank builds the run from CONFIG + overrides (its own temporary run directory, no validation,
no checkpoints), runs the supervised warm start when the config has one (not measured), then `warmup`
steps and `steps` measured steps with `Trainer.train_step`, exactly as `train` would run them (the
probe around each stage only reads memory). Then every rank times the GEMMs of its actor update
(`measure.gemm_peak`, all ranks at once, as in training), the ranks' figures are gathered, and
global rank 0 writes the JSON.

JSON schema (`"benchmark": "step"`; times in seconds, memory in bytes, FLOPs count a multiply-add as 2,
every rate *per rank* = the whole job's amount / world / seconds):

    benchmark, schema (1), date (UTC ISO), command, config: {path, overrides, resolved}
    machine: {device, cpu, num_cpus, load_avg_1_5_15, omp_num_threads, torch_threads, torch, vllm,
              megatron_core, python}, plus load_avg_1_5_15_after
    layout: {world, train: {tp, pp, vpp, dp}, gen: {tp, pp}}
    model: {num_layers, hidden_size, num_heads, num_kv_heads, head_dim, ffn_hidden_size, vocab_size,
            matmul_params, dtype}
    settings: {steps, warmup, warm_start_steps (run, not measured), prompts_per_step, samples_per_prompt,
               max_new_tokens, ppo_epochs, idle_stages (timed, but no model: no tokens/s)}
    stages: the stage names in step order (STAGES: reshard, generate, reward, ref, old_logprobs, values,
            advantages, actor_update, critic_update; a stage the run does not have is 0 s)
    summary and each row of rows (one per step, `warmup: true` for the unmeasured ones; the summary's
    amounts (seconds, tokens, FLOPs) are sums over the measured rows and its rates are computed from
    those sums; its memory and reshard are the largest of the measured rows, i.e. per step):
        seconds                   the step (loop.rl_step's `seconds`, rank 0)
        stage_seconds: {stage}    loop.rl_step's `time/<stage>` (rank 0)
        other_seconds             seconds − Σ stage_seconds (the untimed glue between stages)
        stage_share: {stage}      stage_seconds / seconds
        tokens: {prompt, response, total}   whole job, samples × (prompt + response) tokens, no padding
        tokens_per_s: {step, generated, stages: {stage}}   per rank: total / world / seconds,
                                  response / world / generate seconds, total / world / stage seconds
                                  (None for a stage of 0 s or an idle one)
        actor_update: {flops, flops_per_token, flops_per_s}   model FLOPs of the actor's PPO epochs
                                  (measure.FLOPS_FORMULA), flops_per_s per rank = flops / world / seconds
        mfu: {vs_gemm_peak, vs_datasheet}   actor_update flops_per_s / the measured GEMM rate per rank,
                                  and / the datasheet bf16 peak (GPU; None elsewhere)
        memory: {kind, stages: {stage}, switch, step}   the peak over ranks: RSS (CPU) or
                                  max_memory_allocated (GPU); `switch` = training → generation (reshard,
                                  offload, KV cache wake), `step` = the whole step
        reshard: {bytes, bytes_max_rank, collectives}   received bytes summed over ranks, the most one
                                  rank received, and the most collectives one rank took part in
    peaks: {gemm_flops_per_s (mean over ranks), gemm_flops_per_s_ranks, datasheet_flops_per_s, gemm (rank 0's
            table: name, count, m, k, n, best_s, flops_per_s), flops_formula, notes}
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from hybridflow_mg.bench import RESULTS
from hybridflow_mg.bench.measure import (FLOPS_FORMULA, StageProbe, datasheet_tflops, gemm_peak, machine,
                                         matmul_params, rank_gemms, train_flops_per_seq)

STAGES = ("reshard", "generate", "reward", "ref", "old_logprobs", "values", "advantages", "actor_update",
          "critic_update")
SCHEMA = 1


def bench_overrides(run_root: str | None) -> list[str]:
    """What every benchmark run sets after the user's overrides: a fresh run directory of its own, no
    validation, no checkpoints."""
    root = run_root or os.path.join(tempfile.gettempdir(), f"hybridflow_bench_{os.environ.get('MASTER_PORT', '0')}")
    return [f"run.output_dir={root}", "run.name=bench", "run.overwrite=true", "trainer.resume=never",
            "trainer.val_every=0", "trainer.save_every=0", "trainer.save_final=false"]


# --- figures of one step or a sum of steps ------------------------------------------------------------------------
def figures(*, seconds: float, stage_seconds: dict, prompt_tokens: float, response_tokens: float,
            actor_flops: float, world: int, gemm_flops_per_s: float | None, datasheet_flops_per_s: float | None,
            idle: tuple[str, ...] = ()) -> dict:
    """The derived numbers of a row (or of the summary); each rate is computed here from the amounts it
    reports, so `tokens_per_s.step == tokens.total / world / seconds` by construction. `idle` stages
    (timed, but the run has no model for them) get no tokens/s."""
    stage_seconds = {s: float(stage_seconds.get(s, 0.0)) for s in STAGES} | {
        s: float(v) for s, v in stage_seconds.items() if s not in STAGES}
    total = prompt_tokens + response_tokens

    def rate(amount: float, s: float) -> float | None:
        return amount / world / s if s > 0 else None

    achieved = rate(actor_flops, stage_seconds["actor_update"])
    return {
        "seconds": seconds, "stage_seconds": stage_seconds,
        "other_seconds": seconds - sum(stage_seconds.values()),
        "stage_share": {s: v / seconds for s, v in stage_seconds.items()},
        "tokens": {"prompt": prompt_tokens, "response": response_tokens, "total": total},
        "tokens_per_s": {"step": rate(total, seconds), "generated": rate(response_tokens, stage_seconds["generate"]),
                         "stages": {s: None if s in idle else rate(total, v) for s, v in stage_seconds.items()}},
        "actor_update": {"flops": actor_flops, "flops_per_token": actor_flops / total if total else None,
                         "flops_per_s": achieved},
        "mfu": {"vs_gemm_peak": achieved / gemm_flops_per_s if achieved and gemm_flops_per_s else None,
                "vs_datasheet": achieved / datasheet_flops_per_s if achieved and datasheet_flops_per_s else None},
    }


def actor_flops(dims, prompt_lens: list[int], samples_per_prompt: int, mean_response: float, epochs: int) -> float:
    """Model FLOPs of the actor update: every sample of every prompt, each PPO epoch. A sample's length is
    its prompt's plus the step's mean response length (the step's metrics hold the mean only): exact for
    the 6·N term, and the s² attention term is low by Σ(r − r̄)² per layer, which is small at these lengths."""
    return epochs * samples_per_prompt * sum(train_flops_per_seq(dims, p + mean_response) for p in prompt_lens)


# --- one benchmark session on every rank ----------------------------------------------------------------------------
class Session:
    """A `Trainer` built from `cfg` on this rank, warm-started when configured (not measured); `close()`
    after `gather`. An exception leaves the process groups alone (as `Trainer.fit` does)."""

    def __init__(self, cfg, *, warm_start: bool = True):
        from hybridflow_mg.trainer.trainer import Trainer

        self.trainer = Trainer(cfg)
        self.run = self.trainer.setup()
        self.cfg = self.run.cfg
        self.device = self.run.grid.device
        self.world = self.run.grid.layout.world
        self.rank = dist.get_rank()
        self.machine = machine(self.device)
        if warm_start and self.cfg.actor.warm_start.steps:
            from hybridflow_mg.trainer.warm_start import warm_start

            warm_start(self.run)

    def gemm_peak(self, tokens_per_rank: float) -> dict:
        """This rank's GEMM rate on the shapes of one actor micro-batch (all ranks at once, after a barrier)."""
        cfg, layout, dims = self.cfg, self.run.grid.layout, self.run.spec.dims
        per_micro = min(cfg.actor.micro_batch_tokens, max(1, round(tokens_per_rank / cfg.actor.mini_batches)))
        dist.barrier()
        return gemm_peak(rank_gemms(dims, per_micro, layout.tp, dims.padded_vocab("mcore", layout.tp)),
                         getattr(torch, cfg.model.dtype), self.device)

    def idle_stages(self) -> tuple[str, ...]:
        """Stages the loop times although this run has no model for them (no reference model, no critic)."""
        run = self.run
        return tuple(s for s, absent in (("ref", run.ref is None), ("values", run.critic is None),
                                         ("critic_update", run.critic is None)) if absent)

    def gather(self, local) -> list:
        out = [None] * self.world
        dist.all_gather_object(out, local)
        return out

    def close(self) -> None:
        self.trainer.close()

    def peaks(self, gemms: list[dict]) -> dict:
        rates = [g["flops_per_s"] for g in gemms]
        datasheet = datasheet_tflops(self.machine["device"]) if self.device.type == "cuda" else None
        return {"gemm_flops_per_s": statistics.fmean(rates), "gemm_flops_per_s_ranks": rates,
                "datasheet_flops_per_s": datasheet * 1e12 if datasheet else None, "gemm": gemms[0],
                "flops_formula": FLOPS_FORMULA}

    def header(self, benchmark: str, config_path: str, overrides: list[str]) -> dict:
        cfg, layout, dims = self.cfg, self.run.grid.layout, self.run.spec.dims
        return {
            "benchmark": benchmark, "schema": SCHEMA,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["hybridflow-mg", *sys.argv[1:]]),
            "config": {"path": config_path, "overrides": list(overrides), "resolved": _plain(dataclasses.asdict(cfg))},
            "machine": {**self.machine, "load_avg_1_5_15_after": [round(x, 2) for x in os.getloadavg()]},
            "layout": {"world": layout.world, "train": {"tp": layout.tp, "pp": layout.pp, "vpp": layout.vpp,
                                                        "dp": layout.dp},
                       "gen": {"tp": layout.gen_tp, "pp": layout.gen_pp}},
            "model": {**{k: getattr(dims, k) for k in ("num_layers", "hidden_size", "num_heads", "num_kv_heads",
                                                       "head_dim", "ffn_hidden_size", "vocab_size")},
                      "matmul_params": matmul_params(dims), "dtype": cfg.model.dtype},
        }


def _plain(obj):
    """A resolved config as JSON values (paths and tuples as strings and lists)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj if obj is None or isinstance(obj, (bool, int, float, str)) else str(obj)


def _peek(batches):
    """The batch `next(batches)` will give, without moving the iterator."""
    state = batches.state_dict()
    batch = next(batches)
    batches.load_state_dict(state)
    return batch


# --- bench step ------------------------------------------------------------------------------------------------------
def run_step(cfg, *, steps: int, warmup: int, config_path: str, overrides: list[str], out: str | None) -> dict | None:
    """Run the step benchmark on this rank; rank 0 writes the JSON and returns the report (None elsewhere)."""
    session = Session(cfg)
    run, cfg = session.run, session.cfg
    probe = run.stage_probe = StageProbe(session.device)
    n = run.sampling.n
    local = []
    for i in range(warmup + steps):
        batch = _peek(run.train_batches)
        probe.start_step()
        metrics = session.trainer.train_step()
        local.append({"metrics": {k: v for k, v in metrics.items() if k.startswith("time/") or k in (
                          "seconds", "response_len", "reward_mean", "reshard_mb", "reshard_collectives")},
                      "prompt_lens": [len(p) for p in batch.prompt_ids], "memory": probe.finish_step()})
    run.stage_probe = None
    # tokens one data-parallel rank updates per step, on average over the measured steps
    rank_tokens = statistics.fmean(n * (sum(r["prompt_lens"]) + r["metrics"]["response_len"] * len(r["prompt_lens"]))
                                   for r in local[warmup:]) / run.grid.layout.dp
    gemm = session.gemm_peak(rank_tokens)
    ranks = session.gather({"rows": local, "gemm": gemm})
    report = None
    if session.rank == 0:
        report = step_report(session, ranks, steps=steps, warmup=warmup, config_path=config_path, overrides=overrides)
        write(report, out, default_name("step", session, config_path))
    session.close()
    return report


def step_report(session, ranks: list[dict], *, steps: int, warmup: int, config_path: str, overrides: list[str]) -> dict:
    cfg, dims, world = session.cfg, session.run.spec.dims, session.world
    n, epochs = session.run.sampling.n, cfg.actor.ppo_epochs
    peaks = session.peaks([r["gemm"] for r in ranks])
    idle = session.idle_stages()
    rows, sums = [], None
    for i, row in enumerate(ranks[0]["rows"]):
        m, prompt_lens = row["metrics"], row["prompt_lens"]
        stage_seconds = {k[5:]: v for k, v in m.items() if k.startswith("time/")}
        response_tokens = m["response_len"] * n * len(prompt_lens)
        amounts = dict(seconds=m["seconds"], stage_seconds=stage_seconds, prompt_tokens=float(n * sum(prompt_lens)),
                       response_tokens=response_tokens,
                       actor_flops=actor_flops(dims, prompt_lens, n, m["response_len"], epochs))
        rank_rows = [r["rows"][i] for r in ranks]
        mems = [r["memory"] for r in rank_rows]
        rows.append({"step": i + 1, "warmup": i < warmup, **_figures(amounts, world, peaks, idle),
                     "memory": {"kind": mems[0]["kind"],
                                "stages": {s: max(mm["stages"].get(s, 0) for mm in mems) for s in mems[0]["stages"]},
                                "switch": max(mm["switch"] for mm in mems), "step": max(mm["step"] for mm in mems)},
                     "reshard": {"bytes": sum(round(r["metrics"]["reshard_mb"] * 1e6) for r in rank_rows),
                                 "bytes_max_rank": max(round(r["metrics"]["reshard_mb"] * 1e6) for r in rank_rows),
                                 "collectives": max(int(r["metrics"]["reshard_collectives"]) for r in rank_rows)},
                     "reward_mean": m.get("reward_mean"), "response_len": m["response_len"]})
        if i >= warmup:
            sums = _add(sums, amounts)
    measured = [r for r in rows if not r["warmup"]]
    summary = {"steps": len(measured), **_figures(sums, world, peaks, idle),
               "memory": {"kind": measured[0]["memory"]["kind"],
                          "stages": {s: max(r["memory"]["stages"].get(s, 0) for r in measured)
                                     for s in measured[0]["memory"]["stages"]},
                          "switch": max(r["memory"]["switch"] for r in measured),
                          "step": max(r["memory"]["step"] for r in measured)},
               "reshard": {k: max(r["reshard"][k] for r in measured) for k in ("bytes", "bytes_max_rank", "collectives")}}
    return {**session.header("step", config_path, overrides),
            "settings": {"steps": steps, "warmup": warmup, "warm_start_steps": cfg.actor.warm_start.steps,
                         "prompts_per_step": cfg.data.prompts_per_step, "samples_per_prompt": n,
                         "max_new_tokens": session.run.sampling.max_new_tokens, "ppo_epochs": epochs,
                         "idle_stages": list(idle)},
            "stages": list(STAGES), "summary": summary, "rows": rows,
            "peaks": {**peaks, "notes": "rates per rank; the GEMM ceiling is timed after the steps, on the shapes "
                                        "of one actor micro-batch of this rank (tp-sharded), in the model's dtype"}}


def _figures(amounts: dict, world: int, peaks: dict, idle: tuple[str, ...]) -> dict:
    return figures(**amounts, world=world, gemm_flops_per_s=peaks["gemm_flops_per_s"],
                   datasheet_flops_per_s=peaks["datasheet_flops_per_s"], idle=idle)


def _add(a: dict | None, b: dict) -> dict:
    """Amounts of several steps summed (stage by stage)."""
    if a is None:
        return {**b, "stage_seconds": dict(b["stage_seconds"])}
    out = {k: a[k] + b[k] for k in a if k != "stage_seconds"}
    out["stage_seconds"] = {s: a["stage_seconds"].get(s, 0.0) + b["stage_seconds"].get(s, 0.0)
                            for s in a["stage_seconds"].keys() | b["stage_seconds"].keys()}
    return out


# --- output ------------------------------------------------------------------------------------------------------------
def default_name(benchmark: str, session: Session, config_path: str) -> str:
    device = session.machine["device"]
    kind = "cpu" if device == "cpu" else "".join(c for c in device.lower() if c.isalnum())
    date = dt.date.today().isoformat()
    return f"bench_{benchmark}_{kind}_{Path(config_path).stem}_{date}.json"


def write(report: dict, out: str | None, name: str) -> Path:
    path = Path(out) if out else RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(table(report), flush=True)
    print(f"\nwrote {path}", flush=True)
    return path


def table(report: dict) -> str:
    """A few lines for the console: the summary of a step, rollout or train benchmark."""
    s, lay = report["summary"], report["layout"]
    head = (f"bench {report['benchmark']}: {report['config']['path']} on {lay['world']} ranks "
            f"(train tp{lay['train']['tp']} pp{lay['train']['pp']} dp{lay['train']['dp']}, gen tp{lay['gen']['tp']}), "
            f"{report['machine']['device']}, load {report['machine']['load_avg_1_5_15'][0]}")
    lines = [head, f"  {s['steps']} measured step(s), {s['seconds']:.3f} s; tokens {s['tokens']['total']:.0f} "
                   f"({s['tokens']['response']:.0f} generated)"]
    tps = s["tokens_per_s"]
    lines.append(f"  tokens/s per rank: step {_num(tps.get('step'))}, generated {_num(tps.get('generated'))}")
    if "stage_seconds" in s:
        for stage, sec in s["stage_seconds"].items():
            if sec:
                mem = s.get("memory", {}).get("stages", {}).get(stage)
                lines.append(f"    {stage:14s} {sec:9.3f} s {100 * s['stage_share'][stage]:5.1f}%  "
                             f"{_num(tps['stages'][stage]):>10s} tok/s" + (f"  peak {mem / 2**20:8.1f} MiB" if mem else ""))
        lines.append(f"    {'other':14s} {s['other_seconds']:9.3f} s {100 * s['other_seconds'] / s['seconds']:5.1f}%")
    au, mfu = s.get("actor_update"), s.get("mfu")
    if au:
        lines.append(f"  actor update: {_num(au['flops_per_token'])} FLOPs/token, {_num(au['flops_per_s'])} FLOP/s per rank; "
                     f"MFU {_pct(mfu['vs_gemm_peak'])} of the measured GEMM peak "
                     f"({_num(report['peaks']['gemm_flops_per_s'])} FLOP/s)"
                     + (f", {_pct(mfu['vs_datasheet'])} of the datasheet" if mfu.get("vs_datasheet") else ""))
    if "memory" in s and "switch" in s["memory"]:
        lines.append(f"  peak memory ({s['memory']['kind']}, max over ranks): step {s['memory']['step'] / 2**20:.1f} MiB, "
                     f"training → generation switch {s['memory']['switch'] / 2**20:.1f} MiB")
    if "reshard" in s:
        lines.append(f"  reshard: {s['reshard']['bytes'] / 1e6:.2f} MB received (all ranks), "
                     f"{s['reshard']['collectives']} collectives")
    return "\n".join(lines)


def _num(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"

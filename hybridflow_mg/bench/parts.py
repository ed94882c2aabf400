"""`bench rollout` and `bench train`: one part of the RL step alone, with `bench step`'s machinery and JSON.

rollout: the step's generation stage (`stages.generate`: n samples of each prompt of a batch, spread
over the generation replicas) on the config's layout, weights resharded once before; each round's time
runs from a barrier to a barrier (the slowest rank). The warm start runs first when configured (the
response lengths depend on the policy).

train: the step's actor update (`stages.update`: PPO epochs × mini-batches) on a synthetic batch of
`prompts_per_step × n` samples of `prompt_len + response_len` random tokens, old log-probs from one
untimed forward, one random advantage per sample; no warm start (the weights do not change the work).

JSON: the header of `bench.step` (benchmark, schema, date, command, config, machine, layout, model) with

    settings: rollout {rounds, warmup, prompts_per_step, samples_per_prompt, max_new_tokens, temperature};
              train {steps, warmup, prompts_per_step, samples_per_prompt, prompt_len, response_len,
              ppo_epochs, mini_batches, micro_batch_tokens}
    summary and rows (`warmup: true` for the unmeasured ones; summary sums the measured rows):
        seconds, tokens: {prompt, response, total}
        rollout: tokens_per_s: {step (= total / world / seconds), generated (= response / world / seconds)},
                 lengths: {prompt_mean, prompt_max, response_mean, response_max}, samples
        train: tokens_per_s: {step}, actor_update: {flops, flops_per_token, flops_per_s}, mfu: {vs_gemm_peak,
               vs_datasheet}
    peaks (train): as bench step's
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from hybridflow_mg.bench.measure import train_flops_per_seq
from hybridflow_mg.bench.step import Session, default_name, write


def _timed(fn):
    dist.barrier()
    start = time.perf_counter()
    out = fn()
    dist.barrier()
    return out, time.perf_counter() - start


def _summed(rows: list[dict], keys: tuple[str, ...]) -> dict:
    measured = [r for r in rows if not r["warmup"]]
    out = {"steps": len(measured), "seconds": sum(r["seconds"] for r in measured),
           "tokens": {k: sum(r["tokens"][k] for r in measured) for k in ("prompt", "response", "total")}}
    for key in keys:
        out[key] = sum(r[key] for r in measured)
    return out


# --- rollout -------------------------------------------------------------------------------------------------------
def run_rollout(cfg, *, steps: int, warmup: int, config_path: str, overrides: list[str], out: str | None) -> dict | None:
    from hybridflow_mg.trainer.stages import generate

    session = Session(cfg)
    run, world = session.run, session.world
    _, reshard_s = _timed(run.hybrid.sync_weights)
    rows = []
    for i in range(warmup + steps):
        batch = next(run.train_batches)
        with run.hybrid.generating():
            rollouts, seconds = _timed(lambda: generate(run, batch, i + 1))
        seqs = rollouts.seqs  # this data-parallel rank's samples (its tp ranks hold the same)
        local = torch.tensor([seqs.prompt_lens.sum(), seqs.response_lens.sum(), len(seqs)], dtype=torch.float64,
                             device=session.device)
        top = torch.tensor([seqs.prompt_lens.max(), seqs.response_lens.max()], dtype=torch.float64, device=session.device)
        dist.all_reduce(local, group=run.grid.dp_group)
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=run.grid.dp_group)
        prompt, response, samples = local.tolist()
        rows.append(_rollout_row(i + 1, i < warmup, seconds, prompt, response, samples, top.tolist(), world))
    report = None
    if session.rank == 0:
        s = _summed(rows, ("samples",))
        total = s["tokens"]["total"]
        s |= {"tokens_per_s": {"step": total / world / s["seconds"], "generated": s["tokens"]["response"] / world / s["seconds"]},
              "lengths": {"prompt_mean": s["tokens"]["prompt"] / s["samples"],
                          "response_mean": s["tokens"]["response"] / s["samples"],
                          "prompt_max": max(r["lengths"]["prompt_max"] for r in rows if not r["warmup"]),
                          "response_max": max(r["lengths"]["response_max"] for r in rows if not r["warmup"])},
              "reshard_seconds": reshard_s}
        report = {**session.header("rollout", config_path, overrides),
                  "settings": {"rounds": steps, "warmup": warmup, "prompts_per_step": cfg.data.prompts_per_step,
                               "samples_per_prompt": run.sampling.n, "max_new_tokens": run.sampling.max_new_tokens,
                               "temperature": run.sampling.temperature},
                  "summary": s, "rows": rows}
        write(report, out, default_name("rollout", session, config_path))
    session.close()
    return report


def _rollout_row(step, warm, seconds, prompt, response, samples, top, world) -> dict:
    total = prompt + response
    return {"step": step, "warmup": warm, "seconds": seconds, "samples": samples,
            "tokens": {"prompt": prompt, "response": response, "total": total},
            "tokens_per_s": {"step": total / world / seconds, "generated": response / world / seconds},
            "lengths": {"prompt_mean": prompt / samples, "response_mean": response / samples,
                        "prompt_max": top[0], "response_max": top[1]}}


# --- train ---------------------------------------------------------------------------------------------------------
def synthetic_experience(run, *, prompt_len: int, response_len: int, seed: int):
    """This data-parallel rank's slice of a synthetic batch: random tokens (the same on every rank), old
    log-probs from the actor, one standard-normal advantage per sample on all its response tokens."""
    from hybridflow_mg.rollout.hybrid_engine import dp_slice
    from hybridflow_mg.trainer.batch import Experience, Sequences
    from hybridflow_mg.trainer.stages import old_logprobs

    cfg, n, vocab = run.cfg, run.sampling.n, run.spec.dims.vocab_size
    gen = torch.Generator().manual_seed(seed)
    num_prompts = cfg.data.prompts_per_step
    prompts = torch.randint(1, vocab, (num_prompts, prompt_len), generator=gen).tolist()
    responses = torch.randint(1, vocab, (num_prompts * n, response_len), generator=gen).tolist()
    advantage = torch.randn(num_prompts * n, 1, generator=gen)
    part = dp_slice(num_prompts, run.grid.layout.dp, run.grid.train.dp)
    rows = [p * n + j for p in range(part.start, part.stop) for j in range(n)]
    seqs = Sequences.build([prompts[r // n] for r in rows], [responses[r] for r in rows], [r // n for r in rows])
    mask = seqs.response_mask
    old = old_logprobs(run, seqs)
    return Experience.of(seqs, old_logprobs=old, advantages=advantage[rows] * mask, returns=advantage[rows] * mask,
                         loss_mask=mask, ref_logprobs=old.clone() if cfg.algo.kl.use_in_loss else None)


def run_train(cfg, *, steps: int, warmup: int, config_path: str, overrides: list[str], out: str | None,
              prompt_len: int, response_len: int | None) -> dict | None:
    from hybridflow_mg.trainer.stages import update

    if prompt_len < 1 or (response_len is not None and response_len < 1):
        raise ValueError(f"--prompt-len and --response-len must be at least 1, got {prompt_len} and {response_len}")
    session = Session(cfg, warm_start=False)
    run, world, dims = session.run, session.world, session.run.spec.dims
    response_len = response_len or run.sampling.max_new_tokens
    experience = synthetic_experience(run, prompt_len=prompt_len, response_len=response_len, seed=cfg.run.seed)
    samples = cfg.data.prompts_per_step * run.sampling.n
    seq = prompt_len + response_len
    tokens = float(samples * seq)
    flops = cfg.actor.ppo_epochs * samples * train_flops_per_seq(dims, seq)
    rows = []
    for i in range(warmup + steps):
        _, seconds = _timed(lambda: update(run, run.actor, experience, actor=True))
        rows.append({"step": i + 1, "warmup": i < warmup, "seconds": seconds,
                     "tokens": {"prompt": float(samples * prompt_len), "response": float(samples * response_len),
                                "total": tokens}, "flops": flops})
    gemm = session.gemm_peak(tokens / run.grid.layout.dp)
    peaks = session.peaks(session.gather(gemm))
    report = None
    if session.rank == 0:
        for r in rows:
            r |= _train_figures(r["seconds"], r["tokens"]["total"], r.pop("flops"), world, peaks)
        s = _summed(rows, ())
        s |= _train_figures(s["seconds"], s["tokens"]["total"], flops * s["steps"], world, peaks)
        report = {**session.header("train", config_path, overrides),
                  "settings": {"steps": steps, "warmup": warmup, "prompts_per_step": cfg.data.prompts_per_step,
                               "samples_per_prompt": run.sampling.n, "prompt_len": prompt_len,
                               "response_len": response_len, "ppo_epochs": cfg.actor.ppo_epochs,
                               "mini_batches": cfg.actor.mini_batches, "micro_batch_tokens": cfg.actor.micro_batch_tokens},
                  "summary": s, "rows": rows, "peaks": peaks}
        write(report, out, default_name("train", session, config_path))
    session.close()
    return report


def _train_figures(seconds: float, tokens: float, flops: float, world: int, peaks: dict) -> dict:
    achieved = flops / world / seconds
    datasheet = peaks["datasheet_flops_per_s"]
    return {"tokens_per_s": {"step": tokens / world / seconds},
            "actor_update": {"flops": flops, "flops_per_token": flops / tokens, "flops_per_s": achieved},
            "mfu": {"vs_gemm_peak": achieved / peaks["gemm_flops_per_s"],
                    "vs_datasheet": achieved / datasheet if datasheet else None}}

"""`hybridflow-mg eval`: sample a model on a prompt file through the in-process vLLM path, score, measure.

    inputs = check_inputs(args)          # evaluation/inputs.py: before any process starts
    evaluate(args, inputs)               # every rank (SPMD): load, reshard, sample, score, KL, write

The model is loaded into the Megatron training layout (`--train`; a checkpoint's saved layout by
default) and resharded into vLLM's generation layout (`--gen`), as in a training run
(`rollout.standalone`). Every rank gets every completion (`whole_batch`), scores it with the rule
reward its data source picks, and the logging rank writes:

    --out FILE                 config, model, data, date and every metric (`summary.summarize`)
    FILE.samples.jsonl         one line per sample (`summary.EvalSample.record`)

Both are written to temporary names and renamed when complete, samples first: a killed eval leaves
neither half-written. Without --out the JSON goes to stdout and no samples file is written.

KL to a reference (`--ref MODEL`): the token mean, over every sampled token (the stop token included),
of the k3 estimator r − 1 − log r with r = π_ref(y_t | ·) / π(y_t | ·) (Schulman 2020, "Approximating
KL Divergence": unbiased for KL(π‖π_ref) on samples from π, and ≥ 0 per token); k1 = log π − log π_ref
is reported next to it as `kl_ref_k1`. Both log-probs come from Megatron forward passes with teacher
forcing on the training layout (the trainer's ref stage: the same head, so a model against itself
gives exactly 0), at the sampling temperature (1 when greedy), split over data-parallel ranks.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import sys
import time
from typing import Any

from hybridflow_mg.evaluation.inputs import EvalInputs
from hybridflow_mg.evaluation.summary import EvalSample, summarize
from hybridflow_mg.utils.files import write_text_atomic

CHUNK_PROMPTS = 256
"""Prompts per generation call: the progress bar's step, and a bound on the completions gathered at
once. Seeds follow the prompt's row, so the samples do not depend on it."""
KL_TOKEN_BUDGET = 16384
"""Tokens (sequences × padded length) per micro-batch of the KL forward passes."""


def evaluate(args, inputs: EvalInputs) -> int:
    """The evaluation on this rank (collective); the logging rank writes the results."""
    from hybridflow_mg.algos.kl import k1, k3
    from hybridflow_mg.metrics.progress_bar import progress_bar
    from hybridflow_mg.rewards import RewardConfig, build_reward_fn
    from hybridflow_mg.rollout.config import GREEDY_BELOW, RolloutConfig
    from hybridflow_mg.rollout.standalone import start_policy, stop_ids

    started = time.perf_counter()
    model = inputs.model
    with model.config_dir() as config_dir:
        policy = start_policy(model.weights(), model.spec, config_dir, train=inputs.train, gen=inputs.gen,
                              dtype=args.dtype, rollout=RolloutConfig(
                                  dtype=args.dtype, max_new_tokens=args.max_tokens, max_model_len=inputs.max_model_len,
                                  kv_cache_memory_bytes=args.kv_cache_mb << 20 if args.kv_cache_mb else None),
                              num_decodable_ids=inputs.tokenizer.vocab_size)
    grid = policy.grid
    stops = tuple(dict.fromkeys(stop_ids(model.hf_config) + ((inputs.tokenizer.eos_id,)
                                                            if inputs.tokenizer.eos_id is not None else ())))
    sampling = policy.engine.config.sampling(n=args.n, temperature=inputs.temperature, max_new_tokens=args.max_tokens,
                                             seed=args.seed, stop_token_ids=stops)
    completions = []
    chunks = range(0, len(inputs.items), CHUNK_PROMPTS)
    with policy.hybrid.generating():
        for start in progress_bar(chunks, desc="eval", enabled=grid.is_logging_rank, leave=False):
            part = inputs.items[start:start + CHUNK_PROMPTS]
            chunk = dataclasses.replace(sampling, seed=sampling.request_seed(start))  # the seeds one call would use
            completions += policy.hybrid.generate([it.prompt_ids for it in part], chunk, whole_batch=True)
    reward_fn = build_reward_fn(RewardConfig(fn=inputs.rule) if inputs.rule else RewardConfig())
    samples = _scored(inputs, completions, reward_fn, set(stops))
    if inputs.ref is not None:
        kl_temperature = inputs.temperature if inputs.temperature >= GREEDY_BELOW else 1.0
        sums = _kl_sums(policy, inputs, completions, kl_temperature, estimators=(k3, k1), dtype=args.dtype)
        samples = [dataclasses.replace(s, kl_k3=sums[i][0], kl_k1=sums[i][1]) for i, s in enumerate(samples)]
    if grid.is_logging_rank:
        report = _report(args, inputs, policy, summarize(samples, args.n), time.perf_counter() - started)
        _write(args.out, report, samples)
    policy.close()
    return 0


def _scored(inputs: EvalInputs, completions, reward_fn, stops: set[int]) -> list[EvalSample]:
    """Every sample, decoded, scored and with its answer, in prompt order then sample order."""
    from hybridflow_mg.evaluation.answers import answer_of
    from hybridflow_mg.rewards import score_batch
    from hybridflow_mg.trainer.stages import decode_response

    tok = inputs.tokenizer
    rows = [(item, k, sample) for item, c in zip(inputs.items, completions) for k, sample in enumerate(c.samples)]
    texts = [decode_response(tok, s.token_ids) for _, _, s in rows]
    rewards = score_batch(reward_fn, texts, [it.ground_truth for it, _, _ in rows],
                          [it.data_source for it, _, _ in rows], [it.extra_info for it, _, _ in rows],
                          [it.index for it, _, _ in rows])
    out = []
    for (item, k, s), text, reward in zip(rows, texts, rewards):
        out.append(EvalSample(prompt_index=item.index, sample_index=k, data_source=item.data_source,
                              prompt=inputs.raw_prompts[item.index], ground_truth=item.ground_truth,
                              response_ids=list(s.token_ids), response=text, finish_reason=s.finish_reason,
                              reward=reward, answer=answer_of(text, item.data_source, rule=inputs.rule),
                              diversity_ids=s.without_stop(stops)))
    return out


def _kl_sums(policy, inputs: EvalInputs, completions, temperature: float, *, estimators,
             dtype: str) -> list[tuple[float, ...]]:
    """[samples] (Σ_t est(log π, log π_ref) for each of `estimators`) over each sample's tokens. Each
    data-parallel replica runs the teacher-forced forward passes of both models on every dp-th
    sample; the sums are then gathered over the data-parallel group (collective)."""
    import torch
    import torch.distributed as dist

    from hybridflow_mg.models.build import build_model
    from hybridflow_mg.models.hf_io import load_into_model
    from hybridflow_mg.trainer.batch import Sequences
    from hybridflow_mg.trainer.roles import actor_head
    from hybridflow_mg.trainer.workers import ModelWorker

    grid, lay = policy.grid, policy.grid.layout
    ref_chunks, built = build_model(inputs.ref.spec, grid, role="ref", dtype=dtype)
    load_into_model(ref_chunks, inputs.ref.weights(), tp=lay.tp, tp_rank=grid.train.tp, pp=lay.pp,
                    pp_rank=grid.train.pp, naming=built.naming)
    flat = [(c.prompt_token_ids, s.token_ids) for c in completions for s in c.samples]
    mine = list(range(grid.train.dp, len(flat), lay.dp))
    local: dict[int, tuple[float, ...]] = {}
    if mine:
        seqs = Sequences.build([flat[i][0] for i in mine], [flat[i][1] for i in mine], list(range(len(mine))))
        head = actor_head(grid, temperature=temperature)
        logprobs = ModelWorker(grid, policy.chunks, name="actor").forward(
            seqs, head, names=("logprobs",), token_budget=KL_TOKEN_BUDGET)["logprobs"]  # [B, T] fp32
        ref_logprobs = ModelWorker(grid, ref_chunks, name="ref").forward(
            seqs, head, names=("logprobs",), token_budget=KL_TOKEN_BUDGET)["logprobs"]  # [B, T] fp32
        mask = seqs.response_mask  # [B, T]
        per_sample = [(est(logprobs, ref_logprobs) * mask).sum(dim=1).tolist() for est in estimators]  # [E][B]
        local = {i: tuple(float(v[row]) for v in per_sample) for row, i in enumerate(mine)}
    gathered: list[dict] = [None] * lay.dp  # type: ignore[list-item]
    dist.all_gather_object(gathered, local, group=grid.dp_group)
    merged = {i: v for part in gathered for i, v in part.items()}
    del ref_chunks
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return [merged[i] for i in range(len(flat))]


def _report(args, inputs: EvalInputs, policy, metrics: dict[str, Any], seconds: float) -> dict[str, Any]:
    model, ref = inputs.model, inputs.ref
    return {
        "model": str(model.path), "model_format": model.format, "model_step": model.step,
        "ref": str(ref.path) if ref is not None else None,
        "data": args.data, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "config": {"n": args.n, "temperature": inputs.temperature, "max_tokens": args.max_tokens, "seed": args.seed,
                   "dtype": args.dtype, "reward": inputs.rule or "by data_source", "prompt_key": args.prompt_key,
                   "layout": policy.grid.layout.describe(), "world": policy.grid.layout.world,
                   "kl_estimator": "k3 (Schulman 2020), token mean; kl_ref_k1: k1" if ref is not None else None},
        "seconds": round(seconds, 3),
        "metrics": metrics,
        "samples_file": _samples_path(args.out) if args.out else None,
    }


def _samples_path(out: str) -> str:
    return out + ".samples.jsonl"


def _write(out: str | None, report: dict[str, Any], samples: list[EvalSample]) -> None:
    """The samples file, then the JSON, each under a temporary name renamed when complete."""
    text = json.dumps(report, indent=1) + "\n"
    if out is None:
        sys.stdout.write(text)
        return
    for path, body in ((_samples_path(out), "".join(json.dumps(s.record()) + "\n" for s in samples)), (out, text)):
        write_text_atomic(path, body)
    m = report["metrics"]
    k = report["config"]["n"]
    kl = f", kl_ref {m['kl_ref']:.4f}" if "kl_ref" in m else ""
    print(f"eval {report['model']}: accuracy {m['accuracy']:.4f}, pass@{k} {m[f'pass@{k}']:.4f}, maj@{k} "
          f"{m[f'maj@{k}']:.4f}, response length {m['response_len_mean']:.1f} (p95 {m['response_len_p95']:.1f}), "
          f"truncated {m['truncation_rate']:.3f}{kl} over {m['num_prompts']} prompts × {k}; wrote {out} and "
          f"{_samples_path(out)}", flush=True)

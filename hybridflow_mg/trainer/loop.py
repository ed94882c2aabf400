"""One RL step: HybridFlow's dataflow, as data in and data out (read `rl_step` top to bottom).

    prompts → reshard actor → vLLM generate (n samples/prompt) → rewards → reference log-probs
            → old log-probs → values → advantages → actor update → critic update → metrics

Each stage is one small function in `stages.py` that returns a typed value (`Rollouts`, `Rewards`,
`Advantages`, `Experience`, `UpdateResult`); change one without touching the others. Every rank runs
the same program: generation is spread over the generation replicas, everything after it works on
this rank's training data-parallel slice, and advantages are computed on the whole batch (gathered
over data-parallel ranks) so that group statistics and whitening do not depend on the layout.
`Trainer` (trainer.py) owns the cadence around it: validation, logging, callbacks, checkpoints.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch

from hybridflow_mg.metrics.tracker import Timer
from hybridflow_mg.trainer.batch import Experience
from hybridflow_mg.trainer.stages import (
    advantages,
    generate,
    old_logprobs,
    ref_logprobs,
    score,
    step_metrics,
    update,
    values,
)


def rl_step(run, batch, step: int, *, evaluate: Callable[[], dict] | None = None) -> dict[str, float]:
    """One RL step of `run` (a `setup.Run`) on the prompt `batch`; returns the step's metrics.

    `evaluate`, when given, runs after the reshard and before generation, so it sees the policy before
    this step's update and reuses the step's weight sync; its metrics join the step's (a name the step
    reports too is a ValueError).
    """
    cfg = run.cfg
    progress, probe = getattr(run, "progress", None), getattr(run, "stage_probe", None)

    def entered(stage: str) -> None:
        if progress is not None:
            progress.arrive(stage, step)
        if probe is not None:
            probe.enter(stage)

    timer = Timer(on_enter=entered, on_exit=probe.exit if probe is not None else None)
    start = time.perf_counter()
    evaluated: dict[str, float] = {}
    metrics: dict[str, float] = {}
    with timer("reshard"):
        reshard = run.hybrid.sync_weights()
    # training state out (GPU, optional) before vLLM's KV cache wakes; back after vLLM sleeps
    with offloaded(run), run.hybrid.generating():
        if evaluate is not None:
            with timer("validate"):
                evaluated = evaluate()
        with timer("generate"):
            rollouts = generate(run, batch, step)
    with timer("reward"):
        rewards = score(run, rollouts)
    with timer("ref"):
        ref = ref_logprobs(run, rollouts.seqs)
    with timer("old_logprobs"):
        old = old_logprobs(run, rollouts.seqs)
    with timer("values"):
        vals = values(run, rollouts.seqs)
    with timer("advantages"):
        adv = advantages(run, rollouts.seqs, rewards, old_logprobs=old, ref_logprobs=ref, values=vals)
    experience = Experience.of(rollouts.seqs, old_logprobs=old, advantages=adv.advantages, returns=adv.returns,
                               loss_mask=rollouts.seqs.response_mask * adv.keep.float().unsqueeze(1),  # DAPO
                               ref_logprobs=ref, values=vals)
    with timer("actor_update"):
        actor = update(run, run.actor, experience, actor=True)
    metrics.update(actor.metrics)
    if run.critic is not None:
        with timer("critic_update"):
            metrics.update(update(run, run.critic, experience, actor=False).metrics)
    batch_stats = step_metrics(run, rollouts, rewards, experience, adv.keep, reshard)
    metrics.update(batch_stats.metrics)
    if adv.groups_without_signal is not None:
        metrics["groups_without_signal"] = adv.groups_without_signal
    metrics.update({f"time/{k}": v for k, v in timer.seconds.items()}, seconds=time.perf_counter() - start)
    metrics.update(throughput(metrics, run.grid.layout.world))
    # the controller steers the KL the actor was penalised with, else the KL of the reward penalty (measured
    # on the rollouts); a KL that is only monitored (`algo.kl.monitor`) is not fed to it
    kl = actor.kl if actor.kl is not None else batch_stats.rollout_kl if cfg.algo.kl.use_in_reward else None
    run.kl_controller.update(kl if kl is not None else 0.0, cfg.data.prompts_per_step * run.sampling.n)
    clash = sorted(evaluated.keys() & metrics.keys())
    if clash:
        raise ValueError(f"an evaluator reported {clash[0]!r}, a metric of the step itself; rename it")
    return {**evaluated, **metrics}


def throughput(metrics: dict[str, float], world: int) -> dict[str, float]:
    """Tokens per second of one step from its token counts and seconds (`step_metrics`, the timers).

    perf/tokens_per_s: prompt + response tokens of the step's samples (a prompt counted once per sample,
    as training reads it) over the step's seconds without validation (`time/validate`), whole job;
    perf/tokens_per_s_per_rank: the same over `world` ranks (verl's `perf/throughput`);
    perf/generate_tokens_per_s: the samples' response tokens over the seconds of generation (whole job;
    ReMax's greedy baselines are generated in that time but not counted)."""
    tokens = metrics["perf/prompt_tokens"] + metrics["perf/response_tokens"]
    seconds = max(metrics["seconds"] - metrics.get("time/validate", 0.0), 1e-9)
    generating = max(metrics.get("time/generate", 0.0), 1e-9)
    return {"perf/tokens_per_s": tokens / seconds, "perf/tokens_per_s_per_rank": tokens / seconds / world,
            "perf/generate_tokens_per_s": metrics["perf/response_tokens"] / generating}


@contextlib.contextmanager
def offloaded(run):
    """Training state in host memory for the body (GPU, `trainer.offload_during_rollout`)."""
    if not (run.cfg.trainer.offload_during_rollout and torch.cuda.is_available()):
        yield
        return
    from hybridflow_mg.rollout.offload import TrainingStateOffloader

    movers = [TrainingStateOffloader(w.chunks, w.optimizer) for w in (run.actor, run.critic, run.ref, run.reward_model)
              if w is not None]
    for m in movers:
        m.offload()
    try:
        yield
    finally:
        for m in movers:
            m.reload()

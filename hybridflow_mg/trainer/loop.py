"""The RL loop: HybridFlow's dataflow, one step per batch of prompts (read `train` top to bottom).

    prompts → reshard actor → vLLM generate (n samples/prompt) → rewards → reference log-probs
            → old log-probs → values → advantages → actor update → critic update → metrics

Each stage is one small function below; change one without touching the others. Every rank runs
the same program: generation is spread over the generation replicas, everything after it works on
this rank's training data-parallel slice, and advantages are computed on the whole batch (gathered
over data-parallel ranks) so that group statistics and whitening do not depend on the layout.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hybridflow_mg.algos import AdvantageInput, compute_advantages, compute_kl, count_normalizers
from hybridflow_mg.algos import token_rewards_from_scores
from hybridflow_mg.metrics.tracker import Timer
from hybridflow_mg.rewards import dynamic_sampling_mask, score_batch
from hybridflow_mg.rollout.hybrid_engine import dp_slice
from hybridflow_mg.trainer.batch import Sequences
from hybridflow_mg.trainer.checkpoint import save_actor
from hybridflow_mg.trainer.roles import actor_head, actor_loss, critic_loss, score_head, value_head


@dataclass
class Rollouts:
    """This rank's samples of one step: n per prompt of its data-parallel slice, grouped by prompt."""

    seqs: Sequences
    rollout_logprobs: torch.Tensor  # [B, T] vLLM's log-prob of each sampled token
    items: list  # the PromptItem of each sample
    texts: list[str]  # decoded responses


def train(run) -> dict:
    """Run `trainer.total_steps` RL steps; returns the last step's metrics."""
    cfg = run.cfg
    metrics: dict = {}
    for step in range(1, cfg.trainer.total_steps + 1):
        timer, start = Timer(), time.perf_counter()
        metrics = {}
        batch = next(run.train_batches)
        with timer("reshard"):
            reshard = run.hybrid.sync_weights()
        # training state out (GPU, optional) before vLLM's KV cache wakes; back after vLLM sleeps
        with offloaded(run), run.hybrid.generating():
            if run.val_batches is not None and cfg.trainer.val_every and (step == 1 or step % cfg.trainer.val_every == 0):
                with timer("validate"):
                    metrics["val_reward"] = validate(run)  # the policy before this step's update
            with timer("generate"):
                rollouts = generate(run, batch, step)
        with timer("reward"):
            scores = rewards(run, rollouts)
        with timer("ref"):
            ref_logprobs(run, rollouts)
        with timer("old_logprobs"):
            old_logprobs(run, rollouts)
        with timer("values"):
            values(run, rollouts)
        with timer("advantages"):
            keep = advantages(run, rollouts, scores)
        with timer("actor_update"):
            metrics.update(update(run, run.actor, rollouts, keep, actor=True))
        if run.critic is not None:
            with timer("critic_update"):
                metrics.update(update(run, run.critic, rollouts, keep, actor=False))
        metrics.update(step_metrics(run, rollouts, scores, keep, reshard))
        metrics.update({f"time/{k}": v for k, v in timer.seconds.items()}, seconds=time.perf_counter() - start)
        run.kl_controller.update(metrics.get("kl", metrics.get("rollout_kl", 0.0)),
                                 cfg.data.prompts_per_step * run.sampling.n)  # samples this step, all ranks
        run.tracker.log(step, metrics)
        if cfg.trainer.save_every and step % cfg.trainer.save_every == 0:
            save_actor(run, run.run_dir / "checkpoints" / f"step_{step}")
    return metrics


# --- stages -------------------------------------------------------------------------------------------
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


def generate(run, batch, step: int) -> Rollouts:
    # a fresh base seed per step (a prompt's samples must not repeat when it comes round again)
    sampling = dataclasses.replace(run.sampling, seed=(run.cfg.run.seed * 1_000_003 + step) % 2**31)
    completions = run.hybrid.generate(batch.prompt_ids, sampling)
    part = dp_slice(len(batch), run.grid.layout.dp, run.grid.train.dp)
    prompts, responses, groups, logprobs, items = [], [], [], [], []
    for k, (item, completion) in enumerate(zip(batch.items[part], completions)):
        for sample in completion.samples:
            prompts.append(item.prompt_ids)
            responses.append(sample.token_ids)
            logprobs.append(sample.logprobs)
            groups.append(part.start + k)  # the prompt's index in the global batch: GRPO's group
            items.append(item)
    seqs = Sequences.build(prompts, responses, groups)
    rollout_lp = torch.zeros(len(seqs), seqs.resp_len)
    for i, lp in enumerate(logprobs):
        rollout_lp[i, :len(lp)] = torch.tensor(lp)
    texts = [run.tokenizer.decode([t for t in r if t != run.tokenizer.eos_id]) for r in responses]
    return Rollouts(seqs=seqs, rollout_logprobs=rollout_lp, items=items, texts=texts)


def rewards(run, r: Rollouts) -> torch.Tensor:
    """[B] sequence scores: rule rewards, plus the reward model's score when there is one."""
    scores = torch.tensor(score_batch(run.reward_fn, r.texts, [it.ground_truth for it in r.items],
                                      [it.data_source for it in r.items], [it.extra_info for it in r.items]))
    if run.reward_model is not None:
        rm = run.reward_model.forward(r.seqs, score_head(), names=("score",), token_budget=run.cfg.critic.micro_batch_tokens)
        scores = scores + rm["score"][:, 0]
    return scores


def ref_logprobs(run, r: Rollouts) -> None:
    if run.ref is not None:
        out = run.ref.forward(r.seqs, actor_head(run.grid, temperature=run.sampling.temperature),
                              names=("logprobs",), token_budget=run.cfg.actor.micro_batch_tokens)
        r.seqs.fields["ref_logprobs"] = out["logprobs"]


def old_logprobs(run, r: Rollouts) -> None:
    out = run.actor.forward(r.seqs, actor_head(run.grid, temperature=run.sampling.temperature),
                            names=("logprobs",), token_budget=run.cfg.actor.micro_batch_tokens)
    r.seqs.fields["old_logprobs"] = out["logprobs"]


def values(run, r: Rollouts) -> None:
    if run.critic is not None:
        out = run.critic.forward(r.seqs, value_head(), names=("values",), token_budget=run.cfg.critic.micro_batch_tokens)
        r.seqs.fields["values"] = out["values"]


def _gather_dp(run, t: torch.Tensor, width: int) -> torch.Tensor:
    """This rank's [B, T_local] (or [B]) tensor padded to `width` and gathered over data-parallel ranks
    (through the grid's device: NCCL takes CUDA tensors only); returned on the CPU."""
    if t.dim() == 2:
        t = torch.nn.functional.pad(t, (0, width - t.size(1)))
    t = t.contiguous().to(run.grid.device)
    parts = [torch.empty_like(t) for _ in range(run.grid.layout.dp)]
    dist.all_gather(parts, t, group=run.grid.dp_group)
    return torch.cat(parts).cpu()


def advantages(run, r: Rollouts, scores: torch.Tensor) -> torch.Tensor:
    """Advantages (and critic returns) on the whole batch; returns this rank's [B] keep mask (DAPO)."""
    cfg, seqs = run.cfg, r.seqs
    width = torch.tensor(seqs.resp_len, device=run.grid.device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX, group=run.grid.dp_group)
    width = int(width)
    mask = _gather_dp(run, seqs.response_mask, width)
    all_scores, group = _gather_dp(run, scores.float(), width), _gather_dp(run, seqs.group, width)
    kl = None
    if cfg.algo.kl.use_in_reward:
        kl = _gather_dp(run, compute_kl(seqs.fields["old_logprobs"], seqs.fields["ref_logprobs"], seqs.response_mask,
                                        cfg.algo.kl.estimator), width)
    token_rewards = token_rewards_from_scores(all_scores, mask, kl, run.kl_controller.value if kl is not None else 0.0)
    vals = _gather_dp(run, seqs.fields["values"], width) if "values" in seqs.fields else None
    adv, ret = compute_advantages(AdvantageInput(token_rewards=token_rewards, response_mask=mask, group_index=group,
                                                 values=vals), cfg.algo.advantage)
    keep = torch.ones(len(all_scores), dtype=torch.bool)
    if cfg.reward.dynamic_sampling:
        keep = dynamic_sampling_mask(all_scores, group).keep
    rows = slice(run.grid.train.dp * len(seqs), (run.grid.train.dp + 1) * len(seqs))
    seqs.fields["advantages"] = adv[rows, :seqs.resp_len].float()
    seqs.fields["returns"] = ret[rows, :seqs.resp_len].float()
    return keep[rows]


def update(run, worker, r: Rollouts, keep: torch.Tensor, *, actor: bool) -> dict:
    """PPO epochs × mini-batches of optimizer steps for the actor or the critic."""
    cfg = run.cfg.actor if actor else run.cfg.critic
    seqs = r.seqs
    seqs.fields["loss_mask"] = seqs.response_mask * keep.float().unsqueeze(1)  # DAPO drops whole groups
    prompts = sorted(set(seqs.group.tolist()))
    totals: dict[str, float] = {}
    steps = 0
    for _ in range(cfg.ppo_epochs):
        for m in range(cfg.mini_batches):  # even split: every mini-batch has ⌊P/M⌋ or ⌈P/M⌉ prompts
            chosen = set(prompts[m * len(prompts) // cfg.mini_batches:(m + 1) * len(prompts) // cfg.mini_batches])
            rows = [i for i, g in enumerate(seqs.group.tolist()) if g in chosen]
            mini = seqs.select(rows)
            counts = count_normalizers([mini.fields["loss_mask"]]).to(run.grid.device)
            dist.all_reduce(counts, group=run.grid.dp_group)
            tokens, n_seqs = float(counts[0]), float(counts[1])
            if actor:
                loss = actor_loss(run.grid, run.cfg.algo, num_tokens=tokens, num_seqs=n_seqs,
                                  kl_coef=run.kl_controller.value, temperature=run.sampling.temperature)
            else:
                loss = critic_loss(run.cfg.algo, num_tokens=tokens, num_seqs=n_seqs)
            metrics = worker.train(mini, loss, token_budget=cfg.micro_batch_tokens)
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v
            steps += 1
    prefix = "" if actor else "critic/"
    out = {f"{prefix}grad_norm": totals.get("grad_norm", 0.0) / steps, f"{prefix}loss": totals["loss"] / steps}
    tokens = max(totals.get("tokens", 0.0), 1.0)
    for key in ("pg_loss", "kl", "entropy", "clip_frac", "ppo_kl", "vf_loss", "vf_clip_frac"):
        if key in totals:
            out[f"{prefix}{key}"] = totals[key] / tokens
    return out


def validate(run) -> float:
    """Mean reward of greedy answers on the validation set."""
    greedy = run.engine.config.sampling(n=1, temperature=0.0, max_new_tokens=run.sampling.max_new_tokens,
                                        stop_token_ids=run.sampling.stop_token_ids)
    total, count = 0.0, 0
    for batch in run.val_batches.epoch_batches(0):
        completions = run.hybrid.generate(batch.prompt_ids, greedy, whole_batch=True)
        texts = [run.tokenizer.decode([t for t in c.samples[0].token_ids if t != run.tokenizer.eos_id])
                 for c in completions]
        scores = score_batch(run.reward_fn, texts, batch.ground_truths, batch.data_sources, batch.extra_infos)
        total, count = total + sum(scores), count + len(scores)
    return total / max(count, 1)


def step_metrics(run, r: Rollouts, scores: torch.Tensor, keep: torch.Tensor, reshard) -> dict:
    """Batch statistics over all data-parallel ranks, and the rollout/actor log-prob mismatch."""
    seqs = r.seqs
    mask = seqs.response_mask
    diff = ((r.rollout_logprobs - seqs.fields["old_logprobs"]).abs() * mask)
    kl = 0.0
    if "ref_logprobs" in seqs.fields:  # KL to the reference of the sampled tokens, as the config estimates it
        kl = float(compute_kl(seqs.fields["old_logprobs"], seqs.fields["ref_logprobs"], mask,
                              run.cfg.algo.kl.estimator).sum())
    device = run.grid.device
    local = torch.tensor([scores.sum(), (scores ** 2).sum(), len(scores), mask.sum(), diff.sum(),
                          float(keep.sum()), kl], dtype=torch.float64, device=device)
    worst = torch.tensor([diff.max() if diff.numel() else 0.0], dtype=torch.float64, device=device)
    dist.all_reduce(local, group=run.grid.dp_group)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=run.grid.dp_group)
    s, s2, n, tokens, d, kept, kl_sum = local.tolist()
    mean = s / n
    out = {"reward_mean": mean, "reward_std": max(s2 / n - mean * mean, 0.0) ** 0.5, "response_len": tokens / n,
           "rollout_logprob_diff": d / max(tokens, 1), "rollout_logprob_diff_max": float(worst.item()),
           "samples_kept": kept, "reshard_mb": reshard.recv_bytes / 1e6, "reshard_collectives": reshard.collectives,
           "kl_coef": run.kl_controller.value}
    if "ref_logprobs" in seqs.fields:
        out["rollout_kl"] = kl_sum / max(tokens, 1)
    return out

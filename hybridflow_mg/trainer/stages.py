"""The stages of one RL step (`loop.rl_step` calls them in order), each a function with typed output.

    generate(run, batch, step)            → Rollouts      this rank's samples (and greedy baselines)
    score(run, rollouts)                  → Rewards       [B] sequence scores (and baseline scores)
    ref_logprobs / old_logprobs / values  → [B, T] fp32   Megatron forward passes (None when not built)
    advantages(run, seqs, rewards, ...)   → Advantages    on the whole batch, gathered over DP
    update(run, worker, experience)       → UpdateResult  PPO epochs × mini-batches of optimizer steps
    step_metrics(run, ...)                → BatchStats    batch statistics over all DP ranks

`run` is a `setup.Run`. B is this rank's number of samples (its data-parallel slice of the prompts,
n samples each, grouped by prompt), T the longest response among them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hybridflow_mg.algos import ADVANTAGES, AdvantageInput, compute_advantages, compute_kl, count_normalizers
from hybridflow_mg.algos import token_rewards_from_scores
from hybridflow_mg.data.datasets import PromptItem
from hybridflow_mg.rewards import RewardValueError, dynamic_sampling_mask, score_batch
from hybridflow_mg.rollout.hybrid_engine import dp_slice
from hybridflow_mg.trainer.batch import Experience, Sequences
from hybridflow_mg.trainer.roles import actor_head, actor_loss, critic_loss, score_head, value_head


@dataclass
class Rollouts:
    """This rank's samples of one step: n per prompt of its data-parallel slice, grouped by prompt."""

    seqs: Sequences
    """[B] prompt + response tokens; `seqs.group` is each sample's prompt index in the global batch."""
    rollout_logprobs: torch.Tensor
    """[B, T] fp32 vLLM's log-prob of each sampled token (0 on padding)."""
    items: list[PromptItem]
    """[B] the prompt of each sample (ground truth, data source, extra info)."""
    texts: list[str]
    """[B] decoded responses, EOS removed."""
    truncated: torch.Tensor | None = None
    """[B] bool: the sample hit `max_new_tokens` (or the engine's `max_model_len`) before a stop token
    (vLLM's finish_reason "length")."""
    greedy: "Rollouts | None" = None
    """One greedy response per prompt of this rank's slice, when the run needs a greedy baseline
    (ReMax); its `seqs.group` holds the same global prompt indices."""


@dataclass
class Rewards:
    """Sequence-level scores of this rank's samples."""

    scores: torch.Tensor
    """[B] fp32 rule reward (+ the reward model's score when there is one)."""
    baseline_scores: torch.Tensor | None = None
    """[B] fp32 the score of the greedy response to each sample's prompt (ReMax's baseline)."""


@dataclass
class Advantages:
    """What the estimator made of the whole batch, cut back to this rank's samples."""

    advantages: torch.Tensor
    """[B, T] fp32."""
    returns: torch.Tensor
    """[B, T] fp32 the critic's targets (gae); a copy of the advantages for outcome estimators."""
    keep: torch.Tensor
    """[B] bool False for samples of groups that DAPO's dynamic sampling drops."""
    groups_without_signal: float | None = None
    """Share of the batch's prompt groups whose samples all scored the same, so a group-relative
    estimator gives them advantage 0 (None for estimators without groups). Near 1, the step learns
    little: the task is too easy or too hard for the policy (DAPO's dynamic sampling drops them)."""


@dataclass
class UpdateResult:
    """One role's update over a step."""

    metrics: dict[str, float]
    """Loss, grad norm and the loss's statistics (token means over the step), prefixed `critic/` for
    the critic."""
    kl: float | None = None
    """Token-mean KL(π‖π_ref) the actor loss was penalised with; None when KL is not in the loss."""


@dataclass
class BatchStats:
    """Batch statistics over all data-parallel ranks."""

    metrics: dict[str, float]
    rollout_kl: float | None = None
    """Token-mean KL(π_old‖π_ref) of the sampled tokens, as the config estimates it (None without a
    reference model)."""


def decode_response(tokenizer, token_ids: list[int]) -> str:
    """A response as text: EOS tokens dropped (what reward functions and evaluators read)."""
    return tokenizer.decode([t for t in token_ids if t != tokenizer.eos_id])


# --- generation --------------------------------------------------------------------------------------------
def generate(run, batch, step: int) -> Rollouts:
    """n samples per prompt of this rank's slice of `batch` (and one greedy sample when needed)."""
    # a fresh base seed per step (a prompt's samples must not repeat when it comes round again)
    sampling = dataclasses.replace(run.sampling, seed=(run.cfg.run.seed * 1_000_003 + step) % 2**31)
    rollouts = _rollouts(run, batch, run.hybrid.generate(batch.prompt_ids, sampling))
    if "greedy_baseline" in run.needs:
        greedy = dataclasses.replace(sampling, n=1, temperature=0.0)
        rollouts.greedy = _rollouts(run, batch, run.hybrid.generate(batch.prompt_ids, greedy))
    return rollouts


def _rollouts(run, batch, completions) -> Rollouts:
    part = dp_slice(len(batch), run.grid.layout.dp, run.grid.train.dp)
    prompts, responses, groups, logprobs, items, truncated = [], [], [], [], [], []
    for k, (item, completion) in enumerate(zip(batch.items[part], completions)):
        for sample in completion.samples:
            prompts.append(item.prompt_ids)
            responses.append(sample.token_ids)
            logprobs.append(sample.logprobs)
            truncated.append(sample.finish_reason == "length")
            groups.append(part.start + k)  # the prompt's index in the global batch: GRPO's group
            items.append(item)
    seqs = Sequences.build(prompts, responses, groups)
    rollout_lp = torch.zeros(len(seqs), seqs.resp_len)
    for i, lp in enumerate(logprobs):
        rollout_lp[i, :len(lp)] = torch.tensor(lp)
    texts = [decode_response(run.tokenizer, r) for r in responses]
    return Rollouts(seqs=seqs, rollout_logprobs=rollout_lp, items=items, texts=texts,
                    truncated=torch.tensor(truncated, dtype=torch.bool))


# --- rewards -----------------------------------------------------------------------------------------------
def score(run, r: Rollouts) -> Rewards:
    """Every sample's score; with greedy rollouts, each sample also gets its prompt's greedy score.

    Collective (one scalar all-reduce): a score that is not a finite number on any rank stops every
    rank here, the rank that met it with its one-line `RewardValueError`, the others quietly (exit 2),
    instead of leaving them to wait in the next collective until the timeout."""
    bad: RewardValueError | None = None
    scores = baseline = None
    try:
        scores = _sequence_scores(run, r)
        if r.greedy is not None:
            greedy = _sequence_scores(run, r.greedy)  # [prompts of this rank]
            baseline = greedy[torch.searchsorted(r.greedy.seqs.group, r.seqs.group)]  # each sample's prompt row
    except RewardValueError as e:
        bad = e
    if getattr(run, "progress", None) is not None:  # a rank still scoring is then behind the others
        run.progress.arrive("reward agreement")
    flag = torch.tensor([1.0 if bad is not None else 0.0], device=run.grid.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if bad is not None:
        raise bad
    if flag.item():
        raise PeerRewardError("another rank met a reward that is not a finite number (it says which)")
    return Rewards(scores=scores, baseline_scores=baseline)


class PeerRewardError(ValueError):
    """Another rank's reward function returned a bad value; that rank prints the line, this one exits
    with status 2 quietly."""

    already_said = True


def _sequence_scores(run, r: Rollouts) -> torch.Tensor:
    """[B] rule rewards, plus the reward model's score when there is one."""
    scores = torch.tensor(score_batch(run.reward_fn, r.texts, [it.ground_truth for it in r.items],
                                      [it.data_source for it in r.items], [it.extra_info for it in r.items],
                                      [it.index for it in r.items]))
    if run.reward_model is not None:
        rm = run.reward_model.forward(r.seqs, score_head(), names=("score",), token_budget=run.cfg.critic.micro_batch_tokens)
        scores = scores + rm["score"][:, 0]
    return scores


# --- forward passes on the training layout -----------------------------------------------------------------
def ref_logprobs(run, seqs: Sequences) -> torch.Tensor | None:
    """[B, T] fp32 log π_ref of the sampled tokens; None without a reference model."""
    if run.ref is None:
        return None
    return run.ref.forward(seqs, actor_head(run.grid, temperature=run.sampling.temperature), names=("logprobs",),
                           token_budget=run.cfg.actor.micro_batch_tokens)["logprobs"]


def old_logprobs(run, seqs: Sequences) -> torch.Tensor:
    """[B, T] fp32 log π_old of the sampled tokens (the actor before this step's update)."""
    return run.actor.forward(seqs, actor_head(run.grid, temperature=run.sampling.temperature), names=("logprobs",),
                             token_budget=run.cfg.actor.micro_batch_tokens)["logprobs"]


def values(run, seqs: Sequences) -> torch.Tensor | None:
    """[B, T] fp32 the critic's values; None without a critic."""
    if run.critic is None:
        return None
    return run.critic.forward(seqs, value_head(), names=("values",), token_budget=run.cfg.critic.micro_batch_tokens)["values"]


# --- advantages ----------------------------------------------------------------------------------------------
def _gather_dp(run, t: torch.Tensor, width: int) -> torch.Tensor:
    """This rank's [B, T_local] (or [B]) tensor padded to `width` and gathered over data-parallel ranks
    (through the grid's device: NCCL takes CUDA tensors only); returned on the CPU."""
    if t.dim() == 2:
        t = torch.nn.functional.pad(t, (0, width - t.size(1)))
    t = t.contiguous().to(run.grid.device)
    parts = [torch.empty_like(t) for _ in range(run.grid.layout.dp)]
    dist.all_gather(parts, t, group=run.grid.dp_group)
    return torch.cat(parts).cpu()


def advantages(run, seqs: Sequences, rewards: Rewards, *, old_logprobs: torch.Tensor,
               ref_logprobs: torch.Tensor | None, values: torch.Tensor | None) -> Advantages:
    """Advantages (and critic returns) on the whole batch, gathered over data-parallel ranks, so group
    statistics and whitening do not depend on the layout; returned for this rank's samples."""
    cfg = run.cfg
    width = torch.tensor(seqs.resp_len, device=run.grid.device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX, group=run.grid.dp_group)
    width = int(width)
    mask = _gather_dp(run, seqs.response_mask, width)
    all_scores, group = _gather_dp(run, rewards.scores.float(), width), _gather_dp(run, seqs.group, width)
    kl = None
    if cfg.algo.kl.use_in_reward:
        kl = _gather_dp(run, compute_kl(old_logprobs, ref_logprobs, seqs.response_mask, cfg.algo.kl.estimator), width)
    token_rewards = token_rewards_from_scores(all_scores, mask, kl, run.kl_controller.value if kl is not None else 0.0)
    needs = ADVANTAGES.needs(cfg.algo.advantage.estimator)
    inputs = AdvantageInput(
        token_rewards=token_rewards, response_mask=mask, group_index=group,
        values=_gather_dp(run, values, width) if values is not None else None,
        baseline_scores=(_gather_dp(run, rewards.baseline_scores.float(), width)
                         if rewards.baseline_scores is not None else None),
        ref_logprobs=_gather_dp(run, ref_logprobs, width) if "ref_logprobs" in needs else None)
    adv, ret = compute_advantages(inputs, cfg.algo.advantage)
    keep, without_signal = torch.ones(len(all_scores), dtype=torch.bool), None
    if cfg.reward.dynamic_sampling or "groups" in needs:
        varied = dynamic_sampling_mask(all_scores, group)
        if cfg.reward.dynamic_sampling:
            keep = varied.keep
        if "groups" in needs:
            without_signal = varied.num_groups_dropped / max(varied.num_groups_kept + varied.num_groups_dropped, 1)
    rows = slice(run.grid.train.dp * len(seqs), (run.grid.train.dp + 1) * len(seqs))
    return Advantages(advantages=adv[rows, :seqs.resp_len].float(), returns=ret[rows, :seqs.resp_len].float(),
                      keep=keep[rows], groups_without_signal=without_signal)


# --- updates -------------------------------------------------------------------------------------------------
def update(run, worker, experience: Experience, *, actor: bool) -> UpdateResult:
    """PPO epochs × mini-batches of optimizer steps for the actor or the critic."""
    cfg = run.cfg.actor if actor else run.cfg.critic
    prompts = sorted(set(experience.group.tolist()))
    totals: dict[str, float] = {}
    steps = 0
    for _ in range(cfg.ppo_epochs):
        for m in range(cfg.mini_batches):  # even split: every mini-batch has ⌊P/M⌋ or ⌈P/M⌉ prompts
            chosen = set(prompts[m * len(prompts) // cfg.mini_batches:(m + 1) * len(prompts) // cfg.mini_batches])
            rows = [i for i, g in enumerate(experience.group.tolist()) if g in chosen]
            mini = experience.select(rows)
            counts = count_normalizers([mini.loss_mask]).to(run.grid.device)
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
    out = {f"{prefix}grad_norm": totals.get("grad_norm", 0.0) / steps, f"{prefix}loss": totals["loss"] / steps,
           f"{prefix}update_skipped": totals.get("update_skipped", 0.0)}  # optimizer steps skipped (NaN/Inf)
    tokens = max(totals.get("tokens", 0.0), 1.0)
    for key in ("pg_loss", "kl", "entropy", "clip_frac", "ppo_kl", "vf_loss", "vf_clip_frac"):
        if key in totals:
            out[f"{prefix}{key}"] = totals[key] / tokens
    return UpdateResult(metrics=out, kl=out.get("kl") if actor else None)


# --- metrics -------------------------------------------------------------------------------------------------
def step_metrics(run, r: Rollouts, rewards: Rewards, experience: Experience, keep: torch.Tensor,
                 reshard) -> BatchStats:
    """Batch statistics over all data-parallel ranks, and the rollout/actor log-prob mismatch.

    Keys: reward_mean / reward_std (over samples), response_len (tokens per sample, the stop token
    counted), truncation_rate (share of samples that hit `max_new_tokens` or the engine's `max_model_len`), rollout_logprob_diff (token
    mean |log π_vLLM − log π_Megatron|) and its max, samples_kept (DAPO), reshard_mb / reshard_collectives
    (this rank's weight sync), kl_coef, perf/prompt_tokens and perf/response_tokens (the step's batch,
    whole job); with a reference model rollout_kl (token mean KL(π_old ‖ π_ref), `algo.kl.estimator`)."""
    mask, scores = r.seqs.response_mask, rewards.scores
    diff = ((r.rollout_logprobs - experience.old_logprobs).abs() * mask)
    kl = 0.0
    if experience.ref_logprobs is not None:  # KL to the reference of the sampled tokens, as the config estimates it
        kl = float(compute_kl(experience.old_logprobs, experience.ref_logprobs, mask, run.cfg.algo.kl.estimator).sum())
    baseline = rewards.baseline_scores.sum() if rewards.baseline_scores is not None else 0.0
    device = run.grid.device
    truncated = float(r.truncated.sum()) if r.truncated is not None else 0.0
    local = torch.tensor([scores.sum(), (scores ** 2).sum(), len(scores), mask.sum(), diff.sum(),
                          float(keep.sum()), kl, baseline, truncated, float(r.seqs.prompt_lens.sum())],
                         dtype=torch.float64, device=device)
    worst = torch.tensor([diff.max() if diff.numel() else 0.0], dtype=torch.float64, device=device)
    dist.all_reduce(local, group=run.grid.dp_group)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=run.grid.dp_group)
    s, s2, n, tokens, d, kept, kl_sum, baseline_sum, truncated_sum, prompt_tokens = local.tolist()
    mean = s / n
    out = {"reward_mean": mean, "reward_std": max(s2 / n - mean * mean, 0.0) ** 0.5, "response_len": tokens / n,
           "truncation_rate": truncated_sum / n,
           "rollout_logprob_diff": d / max(tokens, 1), "rollout_logprob_diff_max": float(worst.item()),
           "samples_kept": kept, "reshard_mb": reshard.recv_bytes / 1e6, "reshard_collectives": reshard.collectives,
           "kl_coef": run.kl_controller.value,
           "perf/prompt_tokens": prompt_tokens, "perf/response_tokens": tokens}
    if rewards.baseline_scores is not None:
        out["reward_baseline_mean"] = baseline_sum / n
    rollout_kl = None
    if experience.ref_logprobs is not None:
        rollout_kl = out["rollout_kl"] = kl_sum / max(tokens, 1)
    return BatchStats(metrics=out, rollout_kl=rollout_kl)

"""Advantage estimators: rewards (and values) in, per-token advantages and critic targets out.

Every estimator has one signature, so the loop calls whichever the config names (an estimator that
reads `values`, `baseline_scores` or `ref_logprobs` declares it at registration, e.g.
`@ADVANTAGES.register("gae", needs=("values",))`, and the run then provides it):

    advantages, returns = ADVANTAGES.get(cfg.estimator)(inp, cfg)   # both [batch, resp_len]

`inp` is an `AdvantageInput`; `cfg` an `AdvantageConfig`. Outputs are detached, in float32 (float64
when the rewards are float64), and exactly 0 on padding. `returns` is the critic's regression target
for gae; the outcome estimators (everything else) have no critic and return their advantages there.

Outcome estimators read one score per sequence: the masked sum of `token_rewards` over the response
(the score placed on the last token, minus the KL penalty of every token when KL is in the reward).
Their advantage is broadcast over the sequence's valid tokens.

Whitening and group statistics are taken over the tensors passed in. Pass whole groups (all n samples
of a prompt) in one call; for batch whitening over the global batch, call on the global batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from hybridflow_mg.algos._masked import bool_mask, float_at_least_32, masked_whiten, zero_padding
from hybridflow_mg.algos.config import AdvantageConfig
from hybridflow_mg.utils.registry import Registry

AdvantageFn = Callable[["AdvantageInput", AdvantageConfig], tuple[torch.Tensor, torch.Tensor]]
ADVANTAGES: Registry[AdvantageFn] = Registry("advantage estimator",
                                             needs=("values", "ref_logprobs", "greedy_baseline", "groups"))


@dataclass(kw_only=True)
class AdvantageInput:
    """What an estimator may read. Build `token_rewards` with `token_rewards_from_scores`."""

    token_rewards: torch.Tensor
    """[batch, resp_len] float: reward of each response token (score on the last one, − β·KL per token)."""
    response_mask: torch.Tensor
    """[batch, resp_len] 1 on real response tokens, 0 on right padding."""
    group_index: torch.Tensor | None = None
    """[batch] long: equal values were sampled from the same prompt. Groups may be ragged or of size 1
    (grpo, rloo, reinforce_plus_plus_baseline)."""
    values: torch.Tensor | None = None
    """[batch, resp_len] float: the critic's V(s_t) at rollout time (gae)."""
    baseline_scores: torch.Tensor | None = None
    """[batch] float: score of the greedy response to the same prompt (remax; need `greedy_baseline`)."""
    ref_logprobs: torch.Tensor | None = None
    """[batch, resp_len] float: log π_ref of each response token (need `ref_logprobs`)."""

    def __post_init__(self):
        shape = tuple(self.token_rewards.shape)
        if len(shape) != 2:
            raise ValueError(f"token_rewards must be [batch, resp_len], got shape {shape}")
        bool_mask(self.response_mask, self.token_rewards)
        for name in ("values", "ref_logprobs"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
        for name in ("group_index", "baseline_scores"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != shape[:1]:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({shape[0]},)")

    def mask(self) -> torch.Tensor:
        return bool_mask(self.response_mask, self.token_rewards)

    def rewards(self) -> torch.Tensor:
        """token_rewards, detached, in ≥ float32, 0 on padding."""
        return zero_padding(float_at_least_32(self.token_rewards.detach()), self.mask())

    def scores(self) -> torch.Tensor:
        """[batch] the sequence score of outcome estimators: the sum of token rewards over the response."""
        return self.rewards().sum(-1)

    def require(self, name: str, estimator: str) -> torch.Tensor:
        t = getattr(self, name)
        if t is None:
            raise ValueError(f"advantage estimator {estimator!r} needs AdvantageInput.{name}")
        return float_at_least_32(t.detach()) if t.is_floating_point() else t


def token_rewards_from_scores(scores: torch.Tensor, response_mask: torch.Tensor, kl: torch.Tensor | None = None,
                              kl_coef: float = 0.0) -> torch.Tensor:
    """[batch, resp_len] token rewards: `scores` [batch] on each sequence's last valid token, minus
    `kl_coef` · `kl` [batch, resp_len] on every valid token (the KL is detached: a reward, not a loss).

    A sequence with no valid token gets no reward. Output is ≥ float32 and 0 on padding.
    """
    scores = float_at_least_32(scores.detach())
    mask = response_mask if response_mask.dtype == torch.bool else response_mask != 0
    if mask.dim() != 2 or tuple(scores.shape) != tuple(mask.shape[:1]):
        raise ValueError(f"scores {tuple(scores.shape)} and response_mask {tuple(mask.shape)} must be [batch] "
                         "and [batch, resp_len]")
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, -1).argmax(-1, keepdim=True)  # [batch, 1] last valid token
    rewards = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
    rewards.scatter_(1, last, scores.unsqueeze(1))
    if kl is not None and kl_coef != 0.0:
        if kl.shape != mask.shape:
            raise ValueError(f"kl has shape {tuple(kl.shape)}, expected {tuple(mask.shape)}")
        rewards = rewards - kl_coef * float_at_least_32(kl.detach())
    return zero_padding(rewards, mask)


def _broadcast(seq_adv: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An outcome advantage [batch] spread over the valid tokens; returned as (advantages, returns)."""
    adv = zero_padding(seq_adv.unsqueeze(1).expand(mask.shape), mask)
    return adv, adv.clone()


def group_stats(scores: torch.Tensor, group_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample (group mean, unbiased group std, group size), each [batch].

    A one-member group has std 0 (its n − 1 = 0 is clamped to 1 over a zero sum of squares).
    """
    ids, inverse = torch.unique(group_index, return_inverse=True)  # inverse [batch]: dense group id
    size = scores.new_zeros(ids.numel()).index_add_(0, inverse, torch.ones_like(scores))  # [num_groups]
    mean = torch.zeros_like(size).index_add_(0, inverse, scores) / size
    sq = torch.zeros_like(size).index_add_(0, inverse, (scores - mean[inverse]) ** 2)
    std = (sq / (size - 1).clamp_min(1)).sqrt()
    return mean[inverse], std[inverse], size[inverse]


def _discounted_sum(rewards: torch.Tensor, mask: torch.Tensor, gamma: float, values: torch.Tensor | None,
                    lam: float) -> torch.Tensor:
    """Backward recursion shared by GAE and return-to-go (one loop over resp_len; a kernel per op).

    Masked positions are not steps: the recursion links each valid token to the next valid one, so
    right padding acts as the terminal state (V = 0, nothing after it) and interior holes are skipped.
    With `values`: GAE (Schulman et al. 2015, arXiv 1506.02438)
        δ_t = r_t + γ V_{t+1} − V_t,   A_t = δ_t + γ λ A_{t+1}.
    Without: the return-to-go G_t = r_t + γ G_{t+1}.
    """
    zero = rewards.new_zeros(rewards.shape[0])
    next_value, carry = zero, zero  # V and A (or G) of the next valid token; 0 past the end
    out = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        valid = mask[:, t]
        if values is None:
            step = rewards[:, t] + gamma * carry
        else:
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            step = delta + gamma * lam * carry
            next_value = torch.where(valid, values[:, t], next_value)
        carry = torch.where(valid, step, carry)
        out[:, t] = torch.where(valid, step, zero)
    return out


@ADVANTAGES.register("gae", needs=("values",))
def gae(inp: AdvantageInput, cfg: AdvantageConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation; returns = raw advantages + values (the critic's target).

    With `cfg.gae_whiten` the advantages (not the returns) are whitened over the batch's valid tokens.
    """
    mask = inp.mask()
    values = zero_padding(inp.require("values", "gae"), mask)
    adv = _discounted_sum(inp.rewards(), mask, cfg.gamma, values, cfg.lam)
    returns = zero_padding(adv + values, mask)
    if cfg.gae_whiten:
        adv = masked_whiten(adv, mask, cfg.eps)
    return adv, returns


@ADVANTAGES.register("grpo", needs=("groups",))
def grpo(inp: AdvantageInput, cfg: AdvantageConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO (DeepSeekMath, arXiv 2402.03300): (s − group mean) / (group std + eps), unbiased std.

    `cfg.norm_by_std=False` is Dr.GRPO (arXiv 2503.20783): s − group mean. A one-member group gets 0.
    """
    group = inp.require("group_index", "grpo")
    scores = inp.scores()
    mean, std, size = group_stats(scores, group)
    adv = scores - mean
    if cfg.norm_by_std:
        adv = adv / (std + cfg.eps)
    adv = torch.where(size > 1, adv, torch.zeros_like(adv))
    return _broadcast(adv, inp.mask())


@ADVANTAGES.register("rloo", needs=("groups",))
def rloo(inp: AdvantageInput, cfg: AdvantageConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO (Ahmadian et al. 2024, arXiv 2402.14740): s_i − mean of the other members of the group,
    i.e. n/(n−1) · (s_i − group mean). A one-member group has no other member and gets 0."""
    group = inp.require("group_index", "rloo")
    scores = inp.scores()
    mean, _, size = group_stats(scores, group)
    adv = (scores - mean) * size / (size - 1).clamp_min(1)
    adv = torch.where(size > 1, adv, torch.zeros_like(adv))
    return _broadcast(adv, inp.mask())


@ADVANTAGES.register("reinforce_plus_plus")
def reinforce_plus_plus(inp: AdvantageInput, cfg: AdvantageConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (arXiv 2501.03262): discounted return-to-go of the token rewards with γ, whitened
    over all valid tokens of the batch. `returns` are the raw (unwhitened) returns-to-go."""
    mask = inp.mask()
    returns = _discounted_sum(inp.rewards(), mask, cfg.gamma, None, 1.0)
    return masked_whiten(returns, mask, cfg.eps), returns


@ADVANTAGES.register("reinforce_plus_plus_baseline", needs=("groups",))
def reinforce_plus_plus_baseline(inp: AdvantageInput, cfg: AdvantageConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++-baseline (arXiv 2501.03262): s − group mean, broadcast over the tokens, then whitened
    over all valid tokens of the batch. A one-member group centres to 0 before the whitening."""
    group = inp.require("group_index", "reinforce_plus_plus_baseline")
    scores = inp.scores()
    mean, _, _ = group_stats(scores, group)
    mask = inp.mask()
    adv, _ = _broadcast(scores - mean, mask)
    adv = masked_whiten(adv, mask, cfg.eps)
    return adv, adv.clone()


@ADVANTAGES.register("remax", needs=("greedy_baseline",))
def remax(inp: AdvantageInput, cfg: AdvantageConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """ReMax (arXiv 2310.10505): s − score of the greedy response to the same prompt."""
    baseline = inp.require("baseline_scores", "remax")
    scores = inp.scores()
    return _broadcast(scores - baseline.to(scores.dtype), inp.mask())


def compute_advantages(inp: AdvantageInput, cfg: AdvantageConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The estimator named by `cfg.estimator`, applied: (advantages, returns), both [batch, resp_len]."""
    return ADVANTAGES.get(cfg.estimator)(inp, cfg)


__all__ = ["ADVANTAGES", "AdvantageInput", "compute_advantages", "group_stats", "token_rewards_from_scores"]

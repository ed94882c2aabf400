"""Policy (actor) losses: clipped importance-weighted surrogates, per token, before aggregation.

One signature, so the loop calls whichever the config names (a loss that also reads `ref_logprobs`
or `values` declares it, `@POLICY_LOSSES.register("name", needs=("ref_logprobs",))`, and gets it as
a keyword argument; see `compute_policy_loss`):

    loss_mat, stats = POLICY_LOSSES.get(cfg.name)(logprobs, old_logprobs, advantages, response_mask, cfg)

    logprobs       [batch, resp_len]  log π_θ(y_t), differentiable (the only input with a gradient)
    old_logprobs   [batch, resp_len]  log π_old(y_t) from the rollout policy (detached here)
    advantages     [batch, resp_len]  (detached here)
    response_mask  [batch, resp_len]  1 real token, 0 padding
    loss_mat       [batch, resp_len]  per-token loss in ≥ float32, exactly 0 on padding
    stats          {name: [batch, resp_len]} detached per-token metrics, 0 on padding

The loss is returned per token so that `aggregation.aggregate` can turn it into a scalar exactly across
micro-batches and data-parallel ranks. Stats are per-token for the same reason: reduce them with
`aggregate(stat, mask, "token-mean", num_tokens=...)` to get e.g. the global clip fraction. Every
policy loss reports `clip_frac` (1 where clipping zeroed the token's gradient) and `ppo_kl` (k3
estimate of KL(π_old ‖ π_θ) per token). Padding positions may hold anything (NaN included).

log(π_θ / π_old) is clamped to ±LOG_RATIO_LIMIT (20) before `exp` (see `_masked.py`).
"""
from __future__ import annotations

from typing import Callable

import torch

from hybridflow_mg.algos._masked import LOG_RATIO_LIMIT, bool_mask, float_at_least_32, zero_padding
from hybridflow_mg.algos.config import PolicyLossConfig
from hybridflow_mg.utils.registry import Registry

Stats = dict[str, torch.Tensor]
PolicyLossFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, PolicyLossConfig], tuple[torch.Tensor, Stats]
]
POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy loss", needs=("ref_logprobs", "values"))


def _prepare(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
             response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mask, logp, old_logp, adv): ≥ float32, 0 on padding; old_logp and adv detached.

    Zeroing padding first (with `where`, before any other op) keeps NaN garbage out of the forward
    pass and out of the gradient: `exp(NaN)` behind a later `where` would still send NaN backwards.
    """
    mask = bool_mask(response_mask, logprobs)
    for name, t in (("old_logprobs", old_logprobs), ("advantages", advantages)):
        if t.shape != logprobs.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(logprobs.shape)}")
    logp = zero_padding(float_at_least_32(logprobs), mask)
    old = zero_padding(float_at_least_32(old_logprobs.detach()), mask)
    adv = zero_padding(float_at_least_32(advantages.detach()), mask)
    return mask, logp, old, adv


def _old_new_kl(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(π_old ‖ π_θ) per token from log(π_θ / π_old), detached, 0 on padding."""
    lr = log_ratio.detach().clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    return zero_padding(torch.exp(-lr) - 1.0 + lr, mask)


def _clipped_surrogate(log_ratio: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, eps_low: float,
                       eps_high: float, dual_clip_c: float | None = None) -> tuple[torch.Tensor, Stats]:
    """max(−A·ρ, −A·clip(ρ, 1 − ε_low, 1 + ε_high)) per token, ρ = exp(log_ratio) (PPO, Schulman et al.
    2017, arXiv 1707.06347, written as a loss). With `dual_clip_c`, tokens with A < 0 are further capped
    at −c·A (dual-clip PPO, Ye et al. 2020, arXiv 1912.09729): a huge ratio on a bad token cannot
    produce an unbounded loss."""
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(loss_unclipped, loss_clipped)
    clipped = loss_clipped > loss_unclipped
    stats: Stats = {}
    if dual_clip_c is not None:
        cap = -dual_clip_c * adv
        capped = (adv < 0) & (loss > cap)
        loss = torch.where(capped, cap, loss)
        stats["dual_clip_frac"] = zero_padding(capped.to(loss.dtype), mask)
    stats["clip_frac"] = zero_padding(clipped.to(loss.dtype), mask)
    stats["ppo_kl"] = _old_new_kl(log_ratio, mask)
    return zero_padding(loss, mask), stats


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
             response_mask: torch.Tensor, cfg: PolicyLossConfig) -> tuple[torch.Tensor, Stats]:
    """PPO clip with a symmetric range [1 − clip_eps, 1 + clip_eps]."""
    mask, logp, old, adv = _prepare(logprobs, old_logprobs, advantages, response_mask)
    return _clipped_surrogate(logp - old, adv, mask, cfg.clip_eps, cfg.clip_eps)


@POLICY_LOSSES.register("clip_higher")
def clip_higher(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                response_mask: torch.Tensor, cfg: PolicyLossConfig) -> tuple[torch.Tensor, Stats]:
    """PPO clip with an asymmetric range [1 − ε_low, 1 + ε_high], ε_high > ε_low ("clip-higher", DAPO,
    arXiv 2503.14476): low-probability tokens with positive advantage may grow further, against
    entropy collapse."""
    mask, logp, old, adv = _prepare(logprobs, old_logprobs, advantages, response_mask)
    return _clipped_surrogate(logp - old, adv, mask, cfg.eps_low, cfg.eps_high)


@POLICY_LOSSES.register("dual_clip")
def dual_clip(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
              response_mask: torch.Tensor, cfg: PolicyLossConfig) -> tuple[torch.Tensor, Stats]:
    """Dual-clip PPO: the (possibly asymmetric) PPO clip, plus the cap −c·A where A < 0; reports
    `dual_clip_frac` too."""
    mask, logp, old, adv = _prepare(logprobs, old_logprobs, advantages, response_mask)
    return _clipped_surrogate(logp - old, adv, mask, cfg.eps_low, cfg.eps_high, cfg.dual_clip_c)


@POLICY_LOSSES.register("gspo")
def gspo(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
         response_mask: torch.Tensor, cfg: PolicyLossConfig) -> tuple[torch.Tensor, Stats]:
    """GSPO (arXiv 2507.18071), in the paper's "GSPO-token" form.

    The sequence ratio s_i = exp(mean over the valid tokens of (log π_θ − log π_old)) is clipped to
    [1 − gspo_clip_eps_low, 1 + gspo_clip_eps_high]. Per token we use s_{i,t} = sg[s_i] · π_θ(y_t) /
    sg[π_θ(y_t)]: its value is s_i on every token of sequence i and its gradient in log π_θ(y_t) is s_i,
    so the clip decision is per sequence while the loss stays a per-token matrix like every other.
    With `agg_mode="seq-mean-token-mean"` and sequence-constant advantages this is exactly the paper's
    sequence-level objective (value and gradient); token-mean weights sequences by their length.
    """
    mask, logp, old, adv = _prepare(logprobs, old_logprobs, advantages, response_mask)
    num_valid = mask.sum(-1, keepdim=True).clamp_min(1)  # [batch, 1]
    seq_log_ratio = ((logp - old).sum(-1, keepdim=True) / num_valid).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    token_log_ratio = seq_log_ratio.detach() + logp - logp.detach()  # value: log s_i; grad: 1 per token
    loss, stats = _clipped_surrogate(token_log_ratio, adv, mask, cfg.gspo_clip_eps_low, cfg.gspo_clip_eps_high)
    stats["ppo_kl"] = _old_new_kl(logp - old, mask)  # per token, as for the other losses
    return loss, stats


def compute_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        response_mask: torch.Tensor, cfg: PolicyLossConfig,
                        **available: torch.Tensor | None) -> tuple[torch.Tensor, Stats]:
    """The loss named by `cfg.name`, applied: (loss_mat [batch, resp_len], stats).

    `available` holds the optional per-token inputs the caller has (`ref_logprobs`, `values`, each
    [batch, resp_len]); a loss registered with `needs=(...)` gets those it declared as keyword
    arguments, and a declared one that is missing is a ValueError.
    """
    extras = {}
    for need in POLICY_LOSSES.needs(cfg.name):
        if available.get(need) is None:
            raise ValueError(f"policy loss {cfg.name!r} needs {need}, which the caller did not pass")
        extras[need] = available[need]
    return POLICY_LOSSES.get(cfg.name)(logprobs, old_logprobs, advantages, response_mask, cfg, **extras)


__all__ = ["POLICY_LOSSES", "clip_higher", "compute_policy_loss", "dual_clip", "gspo", "ppo_clip"]

"""Critic loss and entropy bonus, as per-token matrices (aggregate them with `aggregation.aggregate`).

Shapes: every tensor is [batch, resp_len] over response tokens, right-padded, with `response_mask`
1 on real tokens. Outputs are ≥ float32 and exactly 0 on padding; padding inputs are never read.
"""
from __future__ import annotations

import torch

from hybridflow_mg.algos._masked import bool_mask, float_at_least_32, zero_padding
from hybridflow_mg.algos.config import ValueLossConfig


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, response_mask: torch.Tensor,
    cfg: ValueLossConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token 0.5 · max((V − R)², (V_old + clip(V − V_old, −ε, ε) − R)²), ε = cfg.clip_eps.

    values      [batch, resp_len]  V_φ(s_t) now, differentiable
    old_values  [batch, resp_len]  V at rollout time (detached here)
    returns     [batch, resp_len]  the target R, e.g. gae's returns (detached here)

    The clipped term keeps the critic from moving far from the rollout's values in one iteration (the
    PPO value clip; the max makes it pessimistic). `cfg.clip_eps=None` gives plain 0.5 · (V − R)².
    `cfg.coef` is NOT applied here (see `objectives.critic_loss_mat`). Stats: `vf_clip_frac`, 1 where
    the clipped term is the larger (the token's gradient is then 0).
    """
    mask = bool_mask(response_mask, values)
    for name, t in (("old_values", old_values), ("returns", returns)):
        if t.shape != values.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(values.shape)}")
    v = zero_padding(float_at_least_32(values), mask)
    v_old = zero_padding(float_at_least_32(old_values.detach()), mask)
    ret = zero_padding(float_at_least_32(returns.detach()), mask)
    loss_unclipped = (v - ret) ** 2
    if cfg.clip_eps is None:
        return zero_padding(0.5 * loss_unclipped, mask), {"vf_clip_frac": torch.zeros_like(loss_unclipped)}
    v_clipped = v_old + (v - v_old).clamp(-cfg.clip_eps, cfg.clip_eps)
    loss_clipped = (v_clipped - ret) ** 2
    clipped = loss_clipped > loss_unclipped
    loss = 0.5 * torch.maximum(loss_unclipped, loss_clipped)
    return zero_padding(loss, mask), {"vf_clip_frac": zero_padding(clipped.to(loss.dtype), mask)}


def entropy_loss(entropy: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """[batch, resp_len] −entropy (minimising it maximises entropy), 0 on padding.

    `entropy` [batch, resp_len] is H(π_θ(· | s_t)) per response token, computed elsewhere (over the
    vocab-parallel logits); it stays differentiable.
    """
    mask = bool_mask(response_mask, entropy, "response_mask")
    return zero_padding(-float_at_least_32(entropy), mask)


__all__ = ["clipped_value_loss", "entropy_loss"]

"""The actor's and the critic's per-token loss, composed from the registries by the config.

The loop's whole use of this package per micro-batch is then:

    loss_mat, stats = actor_loss_mat(logprobs, old_logprobs, advantages, mask, cfg,
                                     ref_logprobs=ref, entropy=ent, kl_coef=controller.value)
    loss = aggregate(loss_mat, mask, cfg.policy_loss.agg_mode, num_tokens=N, num_seqs=S)

Aggregation is linear in the matrix, so summing the terms per token first and aggregating once is
the same as aggregating each term. All matrices are [batch, resp_len], ≥ float32, 0 on padding.
"""
from __future__ import annotations

import torch

from hybridflow_mg.algos._masked import bool_mask, float_at_least_32, zero_padding
from hybridflow_mg.algos.config import AlgoConfig, ValueLossConfig
from hybridflow_mg.algos.kl import compute_kl
from hybridflow_mg.algos.policy_losses import compute_policy_loss
from hybridflow_mg.algos.value import clipped_value_loss, entropy_loss


def actor_loss_mat(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                   response_mask: torch.Tensor, cfg: AlgoConfig, *, ref_logprobs: torch.Tensor | None = None,
                   entropy: torch.Tensor | None = None, values: torch.Tensor | None = None,
                   kl_coef: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """policy loss + β · KL (when `cfg.kl.use_in_loss`) − entropy coef · H, per token.

    ref_logprobs  [batch, resp_len]  log π_ref(y_t); required when KL is in the loss
    values        [batch, resp_len]  the critic's values at rollout time; passed on to a policy loss
                                     that declared it needs them
    entropy       [batch, resp_len]  H(π_θ(· | s_t)), differentiable; required when cfg.entropy.coef > 0
    kl_coef       β from the KL controller; None uses cfg.kl.coef

    Stats: the policy loss's own, plus `pg_loss`, and `kl` / `entropy` when given, all detached
    per-token matrices (reduce with token-mean for metrics).
    """
    mask = bool_mask(response_mask, logprobs)
    loss, stats = compute_policy_loss(logprobs, old_logprobs, advantages, response_mask, cfg.policy_loss,
                                      ref_logprobs=ref_logprobs, values=values)
    stats["pg_loss"] = loss.detach()
    if cfg.kl.use_in_loss:
        if ref_logprobs is None:
            raise ValueError("kl.use_in_loss is set: actor_loss_mat needs ref_logprobs")
        kl = compute_kl(logprobs, ref_logprobs, mask, cfg.kl.estimator)
        loss = loss + (cfg.kl.coef if kl_coef is None else kl_coef) * kl
        stats["kl"] = kl.detach()
    if cfg.entropy.coef > 0 and entropy is None:
        raise ValueError("entropy.coef > 0: actor_loss_mat needs the per-token entropy")
    if entropy is not None:
        if cfg.entropy.coef > 0:
            loss = loss + cfg.entropy.coef * entropy_loss(entropy, mask)
        stats["entropy"] = zero_padding(float_at_least_32(entropy.detach()), mask)
    return loss, stats


def critic_loss_mat(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                    response_mask: torch.Tensor, cfg: ValueLossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """coef · clipped value loss per token; aggregate with `cfg.agg_mode`."""
    loss, stats = clipped_value_loss(values, old_values, returns, response_mask, cfg)
    stats["vf_loss"] = loss.detach()
    return cfg.coef * loss, stats


__all__ = ["actor_loss_mat", "critic_loss_mat"]

"""Per-token log-probabilities and entropy from vocab-parallel logits, without gathering the vocab.

Each tensor-parallel rank holds logits over its slice of the (padded) vocab, [batch, seq, V/t]. The
softmax denominator and the entropy's Σ p·logit need every slice: each is one all-reduce of a
[batch, seq] tensor over the TP group, never the [batch, seq, V] logits. Padded vocab columns hold
-inf (models/build.py), so they weigh nothing in either.

Gradients: the max is detached (it only stabilises); the sums go through megatron-core's
`reduce_from_tensor_model_parallel_region` (all-reduce forward, identity backward), which is exact
here because every TP rank computes the same loss from the reduced values and back-propagates only
into its own slice.
"""
from __future__ import annotations

import torch


def _all_reduce(x: torch.Tensor, group, op=None) -> torch.Tensor:
    import torch.distributed as dist

    if group is None or dist.get_world_size(group) == 1:
        return x
    if op is not None:  # no-gradient reductions (max)
        x = x.clone()
        dist.all_reduce(x, op=op, group=group)
        return x
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    return reduce_from_tensor_model_parallel_region(x, group=group)


def _local_targets(targets: torch.Tensor, vocab_start: int, vocab_per_rank: int):
    local = targets - vocab_start
    mine = (local >= 0) & (local < vocab_per_rank)
    return local.clamp(0, vocab_per_rank - 1), mine


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, tp_group=None, tp_rank: int = 0,
                   temperature: float = 1.0) -> torch.Tensor:
    """log π(target) per position: logits [b, s, V/t] (this rank's vocab slice), targets [b, s] → [b, s].

    `temperature` divides the logits first (match the sampler's temperature for old/rollout logprobs).
    """
    import torch.distributed as dist

    logits = logits.float() / temperature
    per_rank = logits.size(-1)
    with torch.no_grad():
        top = _all_reduce(logits.max(dim=-1).values, tp_group, op=dist.ReduceOp.MAX)
    shifted = logits - top.unsqueeze(-1)
    log_z = torch.log(_all_reduce(shifted.exp().sum(dim=-1), tp_group))
    local, mine = _local_targets(targets, tp_rank * per_rank, per_rank)
    picked = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1)
    picked = torch.where(mine, picked, torch.zeros_like(picked))  # not `* mine`: -inf (padding) · 0 is nan
    return _all_reduce(picked, tp_group) - log_z


def entropy(logits: torch.Tensor, *, tp_group=None, temperature: float = 1.0) -> torch.Tensor:
    """H(π) per position from vocab-parallel logits [b, s, V/t] → [b, s]: log Z − Σ p·logit."""
    return logprobs_and_entropy(logits, None, tp_group=tp_group, temperature=temperature)[1]


def logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor | None, *, tp_group=None, tp_rank: int = 0,
                         temperature: float = 1.0, entropy_grad: bool = True):
    """(log π(target) or None, H(π)), both [b, s], sharing one max and one log Z (4 all-reduces, one fp32 copy).

    `entropy_grad=False` keeps the entropy out of the graph (a metric only).
    """
    import torch.distributed as dist

    logits = logits.float() / temperature
    with torch.no_grad():
        top = _all_reduce(logits.max(dim=-1).values, tp_group, op=dist.ReduceOp.MAX)
    shifted = logits - top.unsqueeze(-1)
    exp = shifted.exp()
    z = _all_reduce(exp.sum(dim=-1), tp_group)
    logprob = None
    if targets is not None:
        local, mine = _local_targets(targets, tp_rank * logits.size(-1), logits.size(-1))
        picked = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1)
        logprob = _all_reduce(torch.where(mine, picked, torch.zeros_like(picked)), tp_group) - torch.log(z)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        # padded columns hold -inf: replace it before multiplying (0·(-inf) is nan, in the backward too)
        finite = torch.where(exp > 0, shifted, torch.zeros_like(shifted))
        h = torch.log(z) - _all_reduce((exp * finite).sum(dim=-1), tp_group) / z
    return logprob, h

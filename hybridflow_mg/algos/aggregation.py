"""Per-token loss matrix → scalar, exact under micro-batching and data parallelism.

Modes (one convention for the whole package; sums run over valid tokens only):

    token-mean            Σ_seqs Σ_tokens loss / num_tokens
    seq-mean-token-sum    Σ_seqs (Σ_tokens loss) / num_seqs
    seq-mean-token-mean   Σ_seqs (Σ_tokens loss / that seq's valid-token count) / num_seqs

`num_tokens` is the number of valid tokens and `num_seqs` the number of sequences with at least one
valid token, both counted over the WHOLE batch of one optimizer step: every micro-batch of every
data-parallel rank. Each mode is then a sum of per-sequence terms over a global constant, so

    aggregate(full batch) == Σ_ranks Σ_micro-batches aggregate(micro-batch, num_tokens=N, num_seqs=S)

exactly, in value and in gradient. Left out, the normalizers are the local counts of the tensor
passed in (right for a single batch, wrong for a micro-batch). Get the global ones with:

    counts = count_normalizers(mb.response_mask for mb in this_rank_micro_batches)  # [2] float64
    torch.distributed.all_reduce(counts, group=dp_group)   # the caller's job: this module is pure
    num_tokens, num_seqs = counts.tolist()

The identity is for the SUM over micro-batches and ranks. megatron-core's forward-backward divides each
micro-batch loss by num_microbatches (unless `calculate_per_token_loss`) and its DDP averages gradients
over DP (scale 1/dp); multiply the loss by num_microbatches · dp, or switch that scaling off, so that the
optimised quantity is the sum. Sequences with no valid token contribute 0 and are not counted; a zero
normalizer (nothing valid anywhere) is taken as 1, so the loss is 0, never NaN.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from hybridflow_mg.algos._masked import bool_mask, float_at_least_32, masked_sum
from hybridflow_mg.utils.registry import Registry

Normalizer = float | torch.Tensor
AggregationFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
LOSS_AGGREGATIONS: Registry[AggregationFn] = Registry("loss aggregation")


@LOSS_AGGREGATIONS.register("token-mean")
def token_mean(loss_mat: torch.Tensor, mask: torch.Tensor, num_tokens: torch.Tensor,
               num_seqs: torch.Tensor) -> torch.Tensor:
    """Every valid token weighs the same: long responses dominate."""
    return masked_sum(loss_mat, mask) / num_tokens


@LOSS_AGGREGATIONS.register("seq-mean-token-sum")
def seq_mean_token_sum(loss_mat: torch.Tensor, mask: torch.Tensor, num_tokens: torch.Tensor,
                       num_seqs: torch.Tensor) -> torch.Tensor:
    """Mean over sequences of each sequence's token sum (Σ_seqs Σ_tokens is just the masked total)."""
    return masked_sum(loss_mat, mask) / num_seqs


@LOSS_AGGREGATIONS.register("seq-mean-token-mean")
def seq_mean_token_mean(loss_mat: torch.Tensor, mask: torch.Tensor, num_tokens: torch.Tensor,
                        num_seqs: torch.Tensor) -> torch.Tensor:
    """Every sequence weighs the same whatever its length (GRPO's original 1/|o_i| normalisation)."""
    per_seq = masked_sum(loss_mat, mask, -1) / mask.sum(-1).clamp_min(1)  # [batch]; 0 for empty rows
    return per_seq.sum() / num_seqs


def _normalizer(value: Normalizer | None, local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A 0-dim tensor on `like`'s device and dtype, at least 1 (see the module doc)."""
    if value is None:
        value = local
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=like.device, dtype=like.dtype).reshape(()).clamp_min(1)
    return torch.tensor(max(float(value), 1.0), device=like.device, dtype=like.dtype)


def aggregate(loss_mat: torch.Tensor, response_mask: torch.Tensor, mode: str, *,
              num_tokens: Normalizer | None = None, num_seqs: Normalizer | None = None) -> torch.Tensor:
    """0-dim loss (≥ float32) of `loss_mat` [batch, resp_len] under `mode`.

    `num_tokens` / `num_seqs`: the global counts (see the module doc); None uses this tensor's own.
    Each mode reads only the normalizer it needs. Padding entries of `loss_mat` are never read.
    """
    fn = LOSS_AGGREGATIONS.get(mode)
    mask = bool_mask(response_mask, loss_mat)
    loss = float_at_least_32(loss_mat)
    tokens = _normalizer(num_tokens, mask.sum(), loss)
    seqs = _normalizer(num_seqs, mask.any(-1).sum(), loss)
    return fn(loss, mask, tokens, seqs)


def count_normalizers(masks: Iterable[torch.Tensor]) -> torch.Tensor:
    """[2] float64 (num_tokens, num_seqs) summed over `masks` (each [batch, resp_len], 1 = valid).

    Pass every micro-batch this rank will run in one optimizer step, then all-reduce (SUM) the result
    over the data-parallel group; float64 keeps the counts exact.
    """
    total = None
    for m in masks:
        valid = m if m.dtype == torch.bool else m != 0
        counts = torch.stack([valid.sum(), valid.any(-1).sum()]).to(torch.float64)
        total = counts if total is None else total + counts.to(total.device)
    if total is None:
        raise ValueError("count_normalizers needs at least one mask")
    return total


__all__ = ["LOSS_AGGREGATIONS", "aggregate", "count_normalizers"]

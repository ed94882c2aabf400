"""Small masked-tensor helpers shared by the algorithm modules (private: the public API is elsewhere).

Conventions used throughout `hybridflow_mg.algos`:

* Response tensors are `[batch, resp_len]` and right-padded; `response_mask` is 1 (or True) on real
  response tokens and 0 on padding. Any dtype is accepted for the mask; it is compared with 0.
* Padding positions of an input may hold anything, NaN included: the helpers select with
  `torch.where` instead of multiplying by the mask, so garbage never reaches a sum (0 · NaN is NaN).
* Half-precision inputs are computed in float32; float32 and float64 inputs keep their dtype.
"""
from __future__ import annotations

import torch

LOG_RATIO_LIMIT = 20.0
"""Every log-ratio (policy/old, ref/policy) is clamped to ±LOG_RATIO_LIMIT before `exp`. e^20 ≈ 4.9e8
is finite in fp32 and bf16, so a token whose probability collapsed cannot produce inf or NaN; such a
token is far outside any clip range, and past the clamp it gets zero gradient."""


def float_at_least_32(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32 when it is half precision or an integer type, unchanged when float32/float64."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def bool_mask(mask: torch.Tensor, like: torch.Tensor, name: str = "response_mask") -> torch.Tensor:
    """`mask` as bool, after checking it has the shape of `like`."""
    if mask.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(like.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def zero_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`x` with padding positions set to exactly 0 (whatever they held before, NaN included)."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `x` over valid positions (all of them, or along `dim`)."""
    x = zero_padding(x, mask)
    return x.sum() if dim is None else x.sum(dim)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float) -> torch.Tensor:
    """(x − mean) / (std + eps) over the valid positions of the whole tensor; padding → 0.

    `std` is the unbiased (n − 1) standard deviation of the valid entries. With fewer than two
    valid entries std is taken as 0, so a lone entry whitens to 0 rather than NaN.
    """
    n = mask.sum()
    mean = masked_sum(x, mask) / n.clamp_min(1)
    centered = zero_padding(x - mean, mask)
    var = (centered * centered).sum() / (n - 1).clamp_min(1)
    return zero_padding(centered / (var.sqrt() + eps), mask)


def clamped_log_ratio(numer_logprob: torch.Tensor, denom_logprob: torch.Tensor) -> torch.Tensor:
    """log(p_numer / p_denom) = numer − denom, in at least float32, clamped to ±LOG_RATIO_LIMIT."""
    diff = float_at_least_32(numer_logprob) - float_at_least_32(denom_logprob)
    return diff.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)

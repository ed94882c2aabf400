"""KL(π ‖ π_ref) per token: estimators, and controllers of the coefficient β.

Estimators follow J. Schulman, "Approximating KL divergence" (2020). Tokens are sampled from π, and
with r = π_ref(y_t) / π(y_t), i.e. log r = ref_logprob − logprob:

    k1 = −log r              unbiased, can be negative per token
    k2 = ½ (log r)²          biased, low variance, ≥ 0
    k3 = r − 1 − log r       unbiased, low variance, ≥ 0
    abs = |log r|            biased, ≥ 0

Names carried over from verl configs: ``kl`` and ``mse`` are aliases of k1 and k2; ``low_var_kl`` is k3
with its value clamped to [−10, 10] per token, as verl computes it (k3 itself only clamps log r, so an
outlier token with log r > ~2.5 counts fully there and at most 10 here).

(k1 is −log r, not log r: E_π[log r] = −KL, and a penalty must be +KL.) log r is clamped to
±LOG_RATIO_LIMIT (20) before use, so exp(log r) in k3 stays finite; past the clamp the gradient is 0.

One signature: `fn(logprobs [batch, resp_len], ref_logprobs [batch, resp_len]) -> kl [batch, resp_len]`,
elementwise in ≥ float32 and differentiable in `logprobs`. As a reward penalty pass the result to
`token_rewards_from_scores` (which detaches it); as a loss term aggregate it like any per-token loss.
Padding positions are not masked here; `compute_kl` zeroes them.

Controllers hold β as `value` and change it from the KL the loop measured (`update(current_kl,
n_steps)`); the loop reads `value` wherever KL is applied (reward, loss or both).
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

from hybridflow_mg.algos._masked import bool_mask, clamped_log_ratio, zero_padding
from hybridflow_mg.algos.config import KLConfig
from hybridflow_mg.utils.registry import Registry

KLEstimatorFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
KL_ESTIMATORS: Registry[KLEstimatorFn] = Registry("KL estimator")


@KL_ESTIMATORS.register("k1")
@KL_ESTIMATORS.register("kl")
def k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """−log r = logprob − ref_logprob (clamped)."""
    return -clamped_log_ratio(ref_logprobs, logprobs)


@KL_ESTIMATORS.register("k2")
@KL_ESTIMATORS.register("mse")
def k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """½ (log r)²."""
    log_r = clamped_log_ratio(ref_logprobs, logprobs)
    return 0.5 * log_r * log_r


@KL_ESTIMATORS.register("k3")
def k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """r − 1 − log r (≥ 0; its gradient in logprob is 1 − r)."""
    log_r = clamped_log_ratio(ref_logprobs, logprobs)
    return torch.exp(log_r) - 1.0 - log_r


LOW_VAR_KL_LIMIT = 10.0


@KL_ESTIMATORS.register("low_var_kl")
def low_var_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 clamped to [−LOW_VAR_KL_LIMIT, LOW_VAR_KL_LIMIT] (verl's `low_var_kl`); the gradient is 0 past it."""
    return k3(logprobs, ref_logprobs).clamp(-LOW_VAR_KL_LIMIT, LOW_VAR_KL_LIMIT)


@KL_ESTIMATORS.register("abs")
def abs_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """|log r| (clamped): a ≥ 0 penalty whose gradient in logprob is sign(logprob − ref_logprob)."""
    return clamped_log_ratio(ref_logprobs, logprobs).abs()


def compute_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, response_mask: torch.Tensor,
               estimator: str) -> torch.Tensor:
    """[batch, resp_len] the named estimator, 0 on padding (padding inputs are never read, so NaN
    garbage there reaches neither the value nor the gradient)."""
    mask = bool_mask(response_mask, logprobs)
    if ref_logprobs.shape != logprobs.shape:
        raise ValueError(f"ref_logprobs has shape {tuple(ref_logprobs.shape)}, expected {tuple(logprobs.shape)}")
    kl = KL_ESTIMATORS.get(estimator)(zero_padding(logprobs, mask), zero_padding(ref_logprobs.detach(), mask))
    return zero_padding(kl, mask)


class KLController(Protocol):
    """What the loop needs of a controller."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None: ...


KL_CONTROLLERS: Registry[Any] = Registry("KL controller")


class _ControllerState:
    """Resume support: β is the controller's only state, and it must survive a checkpoint."""

    value: float

    def state_dict(self) -> dict[str, float]:
        return {"value": float(self.value)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


@KL_CONTROLLERS.register("fixed")
class FixedKLController(_ControllerState):
    """β stays at its initial value."""

    def __init__(self, coef: float):
        self.value = float(coef)

    @classmethod
    def from_config(cls, cfg: KLConfig) -> "FixedKLController":
        return cls(cfg.coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


@KL_CONTROLLERS.register("adaptive")
class AdaptiveKLController(_ControllerState):
    """Proportional control of β towards a KL target (Ziegler et al. 2019, arXiv 1909.08593):

        β ← β · (1 + clip(current_kl / target − 1, −0.2, 0.2) · n_steps / horizon)

    `n_steps` is how many samples (or steps, in the unit `horizon` is counted in) the measured KL
    covers, typically the batch size of the iteration.
    """

    def __init__(self, coef: float, target: float, horizon: int):
        if not target > 0 or not horizon > 0:
            raise ValueError(f"adaptive KL controller needs target > 0 and horizon > 0, got {target}, {horizon}")
        self.value = float(coef)
        self.target = float(target)
        self.horizon = int(horizon)

    @classmethod
    def from_config(cls, cfg: KLConfig) -> "AdaptiveKLController":
        return cls(cfg.coef, cfg.target, cfg.horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def build_kl_controller(cfg: KLConfig) -> KLController:
    """The controller named by `cfg.controller`, starting at β = `cfg.coef`."""
    return KL_CONTROLLERS.get(cfg.controller).from_config(cfg)


__all__ = ["KL_CONTROLLERS", "KL_ESTIMATORS", "AdaptiveKLController", "FixedKLController", "KLController",
           "build_kl_controller", "compute_kl", "k1", "k2", "k3"]

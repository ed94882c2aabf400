"""Typed configs of the RL algorithm: advantage estimator, policy loss, KL, value loss, entropy.

Same style as `hybridflow_mg.config.schema`: keyword-only dataclasses, a docstring under every field,
`__post_init__` raising a ValueError that names the key. Fields that pick an entry of a registry
(`estimator`, `name`, `agg_mode`, `controller`) are checked against that registry when the config is
built: the registries are imported only then (they import torch), and an unknown name raises the
registry's own message, which lists the valid names. Register custom entries before building a config.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


def _check_name(key: str, value: object, registry: str) -> None:
    """Raise ValueError naming `key` unless `value` is registered in `hybridflow_mg.algos.<registry>`."""
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string naming a registered entry, got {value!r}")
    import hybridflow_mg.algos as algos  # lazy: the registries import torch and register the built-ins

    try:
        getattr(algos, registry).get(value)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None


def _check_range(key: str, value: float, low: float, high: float, *, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (low < value if low_open else low <= value) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"{key} must be a number in {bracket}{low}, {high}], got {value!r}")


def _check_positive(key: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{key} must be a positive number, got {value!r}")


def _check_weight(key: str, value: float) -> None:
    """A loss weight: finite and ≥ 0 (NaN or inf would turn every update into a skipped non-finite one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f"{key} must be a finite number ≥ 0, got {value!r}")


@dataclass(kw_only=True)
class AdvantageConfig:
    """How advantages (and critic targets) are computed from rewards; see `advantages.py`."""

    estimator: str = "grpo"
    """Registered advantage estimator: gae, grpo, rloo, reinforce_plus_plus, reinforce_plus_plus_baseline, remax."""
    gamma: float = 1.0
    """Discount γ per response token (gae, reinforce_plus_plus)."""
    lam: float = 1.0
    """GAE λ: 1 gives Monte-Carlo returns minus the value, 0 gives one-step TD errors (gae only)."""
    norm_by_std: bool = True
    """grpo: divide by the group's std. False is Dr.GRPO (arXiv 2503.20783): centre only."""
    gae_whiten: bool = True
    """gae: whiten the advantages over the batch's valid tokens (returns use the raw advantages)."""
    eps: float = 1e-6
    """Added to every std before dividing (grpo, the whitening of gae and reinforce_plus_plus*)."""

    def __post_init__(self):
        _check_name("estimator", self.estimator, "ADVANTAGES")
        _check_range("gamma", self.gamma, 0.0, 1.0)
        _check_range("lam", self.lam, 0.0, 1.0)
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not 0 < self.eps < math.inf:
            raise ValueError(f"eps must be a finite positive number, got {self.eps!r}")


@dataclass(kw_only=True)
class PolicyLossConfig:
    """The actor's surrogate loss; see `policy_losses.py`."""

    name: str = "ppo_clip"
    """Registered policy loss: ppo_clip, dual_clip, clip_higher, gspo."""
    clip_eps: float = 0.2
    """PPO clip range ε: the ratio is clipped to [1 − ε, 1 + ε] (ppo_clip; default of the two below)."""
    clip_eps_low: float | None = None
    """clip_higher, dual_clip: lower clip ε_low (ratio ≥ 1 − ε_low); left out, it is clip_eps."""
    clip_eps_high: float | None = None
    """clip_higher, dual_clip: upper clip ε_high (ratio ≤ 1 + ε_high); DAPO uses 0.28. Left out: clip_eps."""
    dual_clip_c: float = 3.0
    """dual_clip: where the advantage is negative the loss is capped at −c·A (Ye et al. 2020); c > 1."""
    gspo_clip_eps_low: float = 3e-4
    """gspo: lower clip of the sequence ratio (the GSPO paper's 3e-4; sequence ratios stay close to 1)."""
    gspo_clip_eps_high: float = 4e-4
    """gspo: upper clip of the sequence ratio (the GSPO paper's 4e-4)."""
    agg_mode: str = "token-mean"
    """How the per-token loss becomes a scalar: token-mean, seq-mean-token-sum, seq-mean-token-mean."""

    def __post_init__(self):
        _check_name("name", self.name, "POLICY_LOSSES")
        _check_name("agg_mode", self.agg_mode, "LOSS_AGGREGATIONS")
        _check_range("clip_eps", self.clip_eps, 0.0, 1.0, low_open=True)
        if self.clip_eps_low is not None:
            _check_range("clip_eps_low", self.clip_eps_low, 0.0, 1.0, low_open=True)
        if self.clip_eps_high is not None:
            _check_positive("clip_eps_high", self.clip_eps_high)
        if (self.clip_eps_low is not None or self.clip_eps_high is not None) and self.name not in (
            "clip_higher", "dual_clip"
        ):
            raise ValueError(f"clip_eps_low/clip_eps_high are read only by clip_higher and dual_clip, not by "
                             f"name={self.name!r}; use name=clip_higher for asymmetric clipping")
        if self.name == "clip_higher" and self.clip_eps_high is None:
            raise ValueError("clip_eps_high must be set for name=clip_higher (DAPO uses 0.28); without it the "
                             "loss is plain ppo_clip")
        if isinstance(self.dual_clip_c, bool) or not isinstance(self.dual_clip_c, (int, float)) or \
                not self.dual_clip_c > 1:
            raise ValueError(f"dual_clip_c must be a number > 1, got {self.dual_clip_c!r}")
        _check_range("gspo_clip_eps_low", self.gspo_clip_eps_low, 0.0, 1.0, low_open=True)
        _check_positive("gspo_clip_eps_high", self.gspo_clip_eps_high)

    @property
    def eps_low(self) -> float:
        """The lower clip ε in effect for clip_higher / dual_clip."""
        return self.clip_eps if self.clip_eps_low is None else self.clip_eps_low

    @property
    def eps_high(self) -> float:
        """The upper clip ε in effect for clip_higher / dual_clip."""
        return self.clip_eps if self.clip_eps_high is None else self.clip_eps_high


@dataclass(kw_only=True)
class KLConfig:
    """The KL(π ‖ π_ref) regulariser, as a reward penalty, a loss term, or both; see `kl.py`."""

    use_in_reward: bool = False
    """Subtract coef · KL per token from the token rewards before the advantages (classic RLHF PPO)."""
    use_in_loss: bool = True
    """Add coef · KL per token to the actor loss (GRPO style). k1 in the loss has a zero-mean gradient
    on-policy; prefer k2 or k3 there."""
    estimator: str = "k3"
    """Registered KL estimator: k1 (−log r), k2 (½ (log r)²), k3 (r − 1 − log r), abs (|log r|), with
    r = π_ref / π; verl's names: kl and mse are aliases of k1 and k2, low_var_kl is k3 clamped to [−10, 10]."""
    coef: float = 0.001
    """Initial KL coefficient β (the controller may change it)."""
    controller: str = "fixed"
    """Registered KL controller: fixed, or adaptive (β follows a KL target)."""
    target: float = 0.1
    """adaptive: the KL the controller steers towards, in the units of what the loop passes to `update`."""
    horizon: int = 10000
    """adaptive: steps over which a 20 % KL error changes β by 20 %."""
    monitor: bool = True
    """Build the reference model and log KL(π_old ‖ π_ref) of the sampled tokens (`rollout_kl`, with
    `estimator`) even when KL is in neither the reward nor the loss: a run drifting far from its
    reference shows in the metrics before it shows in the rewards. False saves the reference's
    weights (counted by `plan`) and its forward pass per step when KL is not used."""

    def __post_init__(self):
        _check_name("estimator", self.estimator, "KL_ESTIMATORS")
        _check_name("controller", self.controller, "KL_CONTROLLERS")
        _check_weight("coef", self.coef)
        _check_positive("target", self.target)
        if not isinstance(self.horizon, int) or isinstance(self.horizon, bool) or self.horizon <= 0:
            raise ValueError(f"horizon must be a positive integer, got {self.horizon!r}")

    @property
    def enabled(self) -> bool:
        """Whether KL is part of the objective (in the reward or in the loss)."""
        return self.use_in_reward or self.use_in_loss

    @property
    def needs_reference(self) -> bool:
        """Whether the run needs reference log-probs at all (KL in the objective, or monitored)."""
        return self.enabled or self.monitor


@dataclass(kw_only=True)
class ValueLossConfig:
    """The critic's loss; see `value.py`."""

    clip_eps: float | None = 0.2
    """Value clip: V may move at most ±clip_eps from the rollout's value before the clipped term
    takes over. Left out (None): plain 0.5·(V − R)²."""
    coef: float = 0.5
    """Weight of the value loss."""
    agg_mode: str = "token-mean"
    """How the per-token value loss becomes a scalar (same modes as the policy loss)."""

    def __post_init__(self):
        if self.clip_eps is not None:
            _check_positive("clip_eps", self.clip_eps)
        _check_positive("coef", self.coef)
        _check_name("agg_mode", self.agg_mode, "LOSS_AGGREGATIONS")


@dataclass(kw_only=True)
class EntropyConfig:
    """The entropy bonus of the actor loss."""

    coef: float = 0.0
    """Weight of the bonus: the actor loss gets − coef · entropy per token; 0 switches it off."""

    def __post_init__(self):
        _check_weight("coef", self.coef)


@dataclass(kw_only=True)
class AlgoConfig:
    """Everything algorithmic of one RL run (what is computed, not where)."""

    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    """Advantage estimator and its discounting / normalisation."""
    policy_loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    """Actor surrogate loss, clipping and loss aggregation."""
    kl: KLConfig = field(default_factory=KLConfig)
    """KL regulariser towards the reference model."""
    value_loss: ValueLossConfig = field(default_factory=ValueLossConfig)
    """Critic loss (used only when the estimator needs a critic)."""
    entropy: EntropyConfig = field(default_factory=EntropyConfig)
    """Entropy bonus of the actor."""

    @property
    def needs(self) -> frozenset[str]:
        """What this algorithm needs besides the rollouts (keys of `utils.registry.NEEDS`): what its
        estimator and policy loss declared at registration, plus reference log-probs when KL is used or
        monitored (`kl.monitor`)."""
        import hybridflow_mg.algos as algos  # lazy, as in `_check_name`

        needs = algos.ADVANTAGES.needs(self.advantage.estimator) | algos.POLICY_LOSSES.needs(self.policy_loss.name)
        return needs | {"ref_logprobs"} if self.kl.needs_reference else needs

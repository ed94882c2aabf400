"""RL algorithms as registries of small pure functions: tensors in, tensors out.

    from hybridflow_mg.algos import ADVANTAGES, POLICY_LOSSES, KL_ESTIMATORS, LOSS_AGGREGATIONS, KL_CONTROLLERS

Conventions shared by every function (details in each module):

* response tensors are [batch, resp_len], right-padded; `response_mask` is 1 on real response tokens;
  sequence-level tensors are [batch]; `group_index` [batch] marks samples of the same prompt;
* losses come back per token, 0 on padding, and become scalars only in `aggregate`, whose global
  normalizers make micro-batched, data-parallel training equal one big batch;
* nothing here talks to other processes: callers all-reduce what `count_normalizers` counts.

A researcher adds an estimator or a loss with `@ADVANTAGES.register("name")` (etc.) in a module that
is imported before the config is built; the configs validate names against these registries.
"""
from hybridflow_mg.algos.config import (
    AdvantageConfig,
    AlgoConfig,
    EntropyConfig,
    KLConfig,
    PolicyLossConfig,
    ValueLossConfig,
)
from hybridflow_mg.algos.advantages import ADVANTAGES, AdvantageInput, compute_advantages, token_rewards_from_scores
from hybridflow_mg.algos.aggregation import LOSS_AGGREGATIONS, aggregate, count_normalizers
from hybridflow_mg.algos.kl import KL_CONTROLLERS, KL_ESTIMATORS, KLController, build_kl_controller, compute_kl
from hybridflow_mg.algos.objectives import actor_loss_mat, critic_loss_mat
from hybridflow_mg.algos.policy_losses import POLICY_LOSSES, compute_policy_loss
from hybridflow_mg.algos.value import clipped_value_loss, entropy_loss

__all__ = [
    "ADVANTAGES", "KL_CONTROLLERS", "KL_ESTIMATORS", "LOSS_AGGREGATIONS", "POLICY_LOSSES",
    "AdvantageConfig", "AdvantageInput", "AlgoConfig", "EntropyConfig", "KLConfig", "KLController",
    "PolicyLossConfig", "ValueLossConfig",
    "actor_loss_mat", "aggregate", "build_kl_controller", "clipped_value_loss", "compute_advantages",
    "compute_kl", "compute_policy_loss", "count_normalizers", "critic_loss_mat", "entropy_loss",
    "token_rewards_from_scores",
]

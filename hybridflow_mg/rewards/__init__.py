"""Rewards: rule-based reward functions behind a registry, and how a run picks them.

    REWARD_FNS            name → reward function (gsm8k, math, countdown, arithmetic)
    RewardConfig          fn | mix | per-data-source dispatch, format score, dynamic sampling
    build_reward_fn(cfg)  the one function a run calls per response; score_batch for a batch
    dynamic_sampling_mask DAPO's drop of zero-variance groups

Importing this package registers the built-in rules and imports neither torch nor Megatron. A reward
*model* (a Megatron scorer) plugs in at `base.RewardModelScorer`; it lives in `rewards/model.py`.
"""
from hybridflow_mg.rewards import arithmetic, countdown, gsm8k, math_answer  # noqa: F401  (registers the rules)
from hybridflow_mg.rewards.base import REWARD_FNS, RewardFn, RewardModelScorer
from hybridflow_mg.rewards.compose import (
    DEFAULT_BY_DATA_SOURCE,
    RewardValueError,
    as_reward,
    bind,
    build_reward_fn,
    by_data_source,
    load_fn_by_path,
    resolve,
    score_batch,
    weighted_mix,
)
from hybridflow_mg.rewards.config import RewardConfig, RewardTermConfig
from hybridflow_mg.rewards.dynamic_sampling import DynamicSamplingResult, dynamic_sampling_mask

__all__ = [
    "REWARD_FNS",
    "RewardFn",
    "RewardModelScorer",
    "RewardConfig",
    "RewardTermConfig",
    "DEFAULT_BY_DATA_SOURCE",
    "RewardValueError",
    "as_reward",
    "bind",
    "build_reward_fn",
    "by_data_source",
    "load_fn_by_path",
    "resolve",
    "score_batch",
    "weighted_mix",
    "DynamicSamplingResult",
    "dynamic_sampling_mask",
]

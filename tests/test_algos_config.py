"""Algorithm configs: defaults, validation messages that name the key, registry-checked names."""
import pytest

from hybridflow_mg.algos import (
    ADVANTAGES,
    AdvantageConfig,
    AlgoConfig,
    EntropyConfig,
    KLConfig,
    PolicyLossConfig,
    ValueLossConfig,
)
from hybridflow_mg.config.load import ConfigError, build


def test_defaults_build():
    cfg = AlgoConfig()
    assert (cfg.advantage.estimator, cfg.policy_loss.name, cfg.kl.estimator) == ("grpo", "ppo_clip", "k3")
    assert cfg.needs == {"ref_logprobs", "groups"}  # KL in the loss by default: a reference model, no critic
    assert AlgoConfig(advantage=AdvantageConfig(estimator="gae")).needs == {"values", "ref_logprobs"}
    # KL out of the objective: the reference is still built to log KL to it, unless monitoring is off too
    assert AlgoConfig(advantage=AdvantageConfig(estimator="remax"), kl=KLConfig(use_in_loss=False)).needs == \
        {"greedy_baseline", "ref_logprobs"}
    assert AlgoConfig(advantage=AdvantageConfig(estimator="remax"),
                      kl=KLConfig(use_in_loss=False, monitor=False)).needs == {"greedy_baseline"}


@pytest.mark.parametrize("make, key", [
    (lambda: AdvantageConfig(estimator="grpoo"), "estimator"),
    (lambda: PolicyLossConfig(name="ppo"), "name"),
    (lambda: PolicyLossConfig(agg_mode="mean"), "agg_mode"),
    (lambda: KLConfig(estimator="k4"), "estimator"),
    (lambda: KLConfig(controller="pid"), "controller"),
    (lambda: ValueLossConfig(agg_mode="sum"), "agg_mode"),
])
def test_unknown_registry_names_name_the_key_and_list_valid_names(make, key):
    with pytest.raises(ValueError, match=rf"^{key}: unknown .*; valid names: "):
        make()


def test_registry_get_error_lists_valid_names():
    with pytest.raises(ValueError) as e:
        ADVANTAGES.get("grpoo")
    assert "did you mean 'grpo'" in str(e.value)
    assert "gae, grpo, reinforce_plus_plus, reinforce_plus_plus_baseline, remax, rloo" in str(e.value)


@pytest.mark.parametrize("make, key", [
    (lambda: AdvantageConfig(gamma=1.5), "gamma"),
    (lambda: AdvantageConfig(lam=-0.1), "lam"),
    (lambda: AdvantageConfig(eps=0.0), "eps"),
    (lambda: PolicyLossConfig(clip_eps=0.0), "clip_eps"),
    (lambda: PolicyLossConfig(name="dual_clip", dual_clip_c=0.5), "dual_clip_c"),
    (lambda: PolicyLossConfig(clip_eps_high=0.28), "clip_eps_low/clip_eps_high"),  # ppo_clip is symmetric
    (lambda: PolicyLossConfig(name="clip_higher"), "clip_eps_high"),
    (lambda: PolicyLossConfig(name="gspo", gspo_clip_eps_low=2.0), "gspo_clip_eps_low"),
    (lambda: KLConfig(coef=-1.0), "coef"),
    (lambda: KLConfig(horizon=0), "horizon"),
    (lambda: ValueLossConfig(clip_eps=-0.2), "clip_eps"),
    (lambda: EntropyConfig(coef=-0.01), "coef"),
])
def test_bad_values_name_the_key(make, key):
    with pytest.raises(ValueError, match=rf"^{key}"):
        make()


def test_asymmetric_clip_resolution():
    cfg = PolicyLossConfig(name="clip_higher", clip_eps=0.2, clip_eps_high=0.28)
    assert (cfg.eps_low, cfg.eps_high) == (0.2, 0.28)
    assert (PolicyLossConfig(name="dual_clip").eps_low, PolicyLossConfig(name="dual_clip").eps_high) == (0.2, 0.2)


def test_loads_through_the_project_config_loader():
    cfg = build(AlgoConfig, {"advantage": {"estimator": "gae", "lam": "0.95"},
                             "policy_loss": {"name": "clip_higher", "clip_eps_high": "0.28"},
                             "value_loss": {"clip_eps": "null"}})
    assert cfg.advantage.lam == 0.95 and cfg.policy_loss.eps_high == 0.28 and cfg.value_loss.clip_eps is None
    with pytest.raises(ConfigError, match=r"^policy_loss: name: unknown policy loss 'ppo'"):
        build(AlgoConfig, {"policy_loss": {"name": "ppo"}})
    with pytest.raises(ConfigError, match="did you mean 'kl.estimator'"):
        build(AlgoConfig, {"kl": {"estimatr": "k1"}})


def test_registry_entries_declare_what_they_need():
    from hybridflow_mg.algos import ADVANTAGES, POLICY_LOSSES
    from hybridflow_mg.utils.registry import Registry

    assert ADVANTAGES.needs("gae") == {"values"} and ADVANTAGES.needs("remax") == {"greedy_baseline"}
    assert ADVANTAGES.needs("grpo") == {"groups"} and POLICY_LOSSES.needs("ppo_clip") == frozenset()
    assert ADVANTAGES.needs("reinforce_plus_plus") == frozenset()
    with pytest.raises(ValueError, match="declares needs \\['greedy_baseline'\\] that a policy loss cannot get; "
                                         "valid: ref_logprobs, values"):
        POLICY_LOSSES.register("x", needs=("greedy_baseline",))
    with pytest.raises(ValueError, match="unknown needs \\['critic'\\]"):
        Registry("thing", needs=("critic",))
    assert "x" not in POLICY_LOSSES
    with pytest.raises(ValueError, match="unknown advantage estimator 'grpoo'"):
        ADVANTAGES.needs("grpoo")

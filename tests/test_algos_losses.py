"""Policy losses, KL estimators and controllers, value loss: hand-worked values and gradients."""
import math

import pytest
import torch

from hybridflow_mg.algos import (
    KL_CONTROLLERS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    AlgoConfig,
    EntropyConfig,
    KLConfig,
    PolicyLossConfig,
    ValueLossConfig,
    actor_loss_mat,
    aggregate,
    build_kl_controller,
    clipped_value_loss,
    compute_kl,
)

NAN = float("nan")
F64 = torch.float64


def _run(name, ratios, advs, mask, **cfg):
    """Policy loss `name` with old_logprobs = 0, so logprobs = log(ratio); padding holds NaN."""
    mask = torch.tensor(mask)
    logp = torch.tensor(ratios, dtype=F64).log().masked_fill(mask == 0, NAN).requires_grad_()
    old = torch.zeros_like(logp).masked_fill(mask == 0, NAN)
    adv = torch.tensor(advs, dtype=F64).masked_fill(mask == 0, NAN)
    loss, stats = POLICY_LOSSES.get(name)(logp, old, adv, mask, PolicyLossConfig(name=name, **cfg))
    loss.sum().backward()
    return loss.detach(), logp.grad, stats


def _close(a, b):
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), atol=1e-9, rtol=1e-7)


def test_ppo_clip_clips_one_token_and_not_another():
    # ε = 0.2. loss = max(−A·ρ, −A·clip(ρ, 0.8, 1.2)); d/dlogp is −A·ρ unclipped, 0 clipped.
    loss, grad, stats = _run("ppo_clip", [[1.5, 1.1], [0.5, 1.0]], [[1.0, 1.0], [-2.0, 0.0]], [[1, 1], [1, 0]])
    # (ρ 1.5, A 1): max(−1.5, −1.2) = −1.2 clipped | (1.1, 1): −1.1 | (0.5, −2): max(1.0, 1.6) = 1.6 clipped
    _close(loss, [[-1.2, -1.1], [1.6, 0.0]])
    _close(grad, [[0.0, -1.1], [0.0, 0.0]])
    _close(stats["clip_frac"], [[1.0, 0.0], [1.0, 0.0]])
    # ppo_kl = k3 of KL(old‖new) = 1/ρ − 1 + log ρ
    _close(stats["ppo_kl"], [[1 / 1.5 - 1 + math.log(1.5), 1 / 1.1 - 1 + math.log(1.1)],
                             [1 / 0.5 - 1 + math.log(0.5), 0.0]])


def test_clip_higher_lets_a_positive_token_grow_past_the_low_bound():
    # ε_low 0.2, ε_high 0.28: (1.25, A 1) is inside [0.8, 1.28] (ppo_clip would clip it at 1.2)
    loss, grad, stats = _run("clip_higher", [[1.5, 1.25], [0.5, 1.0]], [[1.0, 1.0], [-2.0, 0.0]],
                             [[1, 1], [1, 0]], clip_eps_high=0.28)
    # (1.5, 1): −1.28 clipped | (1.25, 1): −1.25 | (0.5, −2): max(2·0.5, 2·0.8) = 1.6 clipped
    _close(loss, [[-1.28, -1.25], [1.6, 0.0]])
    _close(grad, [[0.0, -1.25], [0.0, 0.0]])
    _close(stats["clip_frac"], [[1.0, 0.0], [1.0, 0.0]])


def test_dual_clip_caps_negative_advantages_only():
    # ε = 0.2, c = 3.
    loss, grad, stats = _run("dual_clip", [[4.0, 2.0, 4.0]], [[-1.0, -1.0, 1.0]], [[1, 1, 1]])
    # (4, −1): max(4, 1.2) = 4 > c·|A| = 3 → 3, gradient 0 (dual clip active)
    # (2, −1): max(2, 1.2) = 2 ≤ 3 → 2, gradient −A·ρ = 2
    # (4, +1): max(−4, −1.2) = −1.2, ordinary clip; the cap never applies to A > 0
    _close(loss, [[3.0, 2.0, -1.2]])
    _close(grad, [[0.0, 2.0, 0.0]])
    _close(stats["dual_clip_frac"], [[1.0, 0.0, 0.0]])
    _close(stats["clip_frac"], [[0.0, 0.0, 1.0]])


def test_gspo_clips_the_sequence_ratio_and_matches_the_sequence_objective():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    log_ratio = torch.tensor([[0.1, 0.3, NAN], [0.0004, -0.0010, 0.0003]], dtype=F64)
    adv = torch.tensor([[1.0, 1.0, NAN], [-2.0, -2.0, -2.0]], dtype=F64)
    # row 0: s = exp((0.1 + 0.3)/2) = e^0.2 ≈ 1.2214 > 1 + 4e-4 with A > 0 → clipped: −1.0004 per token
    # row 1: s = exp((0.0004 − 0.001 + 0.0003)/3) = e^−0.0001 inside [1 − 3e-4, 1 + 4e-4] → 2·s per token
    s1 = math.exp(-0.0001)
    cfg = PolicyLossConfig(name="gspo", agg_mode="seq-mean-token-mean")
    logp = log_ratio.clone().requires_grad_()
    old = torch.zeros_like(logp).masked_fill(mask == 0, NAN)
    loss, stats = POLICY_LOSSES.get("gspo")(logp, old, adv, mask, cfg)
    _close(loss.detach(), [[-1.0004, -1.0004, 0.0], [2 * s1, 2 * s1, 2 * s1]])
    _close(stats["clip_frac"], [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    aggregate(loss, mask, cfg.agg_mode).backward()
    # d/dlogp_t of (1/2)·(1/3)·Σ_t(−A·s) = −A·s/(2·3) per token of row 1; row 0 is clipped
    _close(logp.grad, [[0.0, 0.0, 0.0], [2 * s1 / 6] * 3])

    # The same gradient from the paper's sequence-level objective, mean_i max(−A s_i, −A clip(s_i)):
    ref_logp = log_ratio.nan_to_num(0.0).requires_grad_()
    s = torch.exp((ref_logp * mask).sum(-1) / mask.sum(-1))
    a = torch.tensor([1.0, -2.0], dtype=F64)
    torch.maximum(-a * s, -a * s.clamp(1 - 3e-4, 1 + 4e-4)).mean().backward()
    _close(logp.grad, ref_logp.grad)


def test_policy_loss_gradient_is_finite_with_nan_padding():
    for name in POLICY_LOSSES:
        extra = {"clip_eps_high": 0.28} if name == "clip_higher" else {}
        loss, grad, _ = _run(name, [[1.1, 1.0]], [[1.0, 0.0]], [[1, 0]], **extra)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), name


def test_kl_estimators_by_hand():
    # token 0: π = 0.5, π_ref = 0.25 → log r = log 0.5;  token 1: π = 0.2, π_ref = 0.4 → log r = log 2
    logp = torch.tensor([[math.log(0.5), math.log(0.2)]], dtype=F64, requires_grad=True)
    ref = torch.tensor([[math.log(0.25), math.log(0.4)]], dtype=F64)
    ln2 = math.log(2)
    _close(KL_ESTIMATORS.get("k1")(logp, ref).detach(), [[ln2, -ln2]])  # −log r
    _close(KL_ESTIMATORS.get("k2")(logp, ref).detach(), [[0.5 * ln2 ** 2, 0.5 * ln2 ** 2]])  # ½ (log r)²
    k3 = KL_ESTIMATORS.get("k3")(logp, ref)
    _close(k3.detach(), [[0.5 - 1 + ln2, 2 - 1 - ln2]])  # r − 1 − log r with r = 0.5, 2
    k3.sum().backward()
    _close(logp.grad, [[1 - 0.5, 1 - 2.0]])  # d k3 / d logp = 1 − r
    _close(KL_ESTIMATORS.get("abs")(logp, ref).detach(), [[ln2, ln2]])  # |log r|


def test_kl_estimator_names_from_verl_configs_are_aliases():
    # verl: kl = k1, mse = k2, low_var_kl = k3 clamped to [-10, 10]; `abs` is its own estimator (above)
    logp = torch.tensor([[math.log(0.5), math.log(0.2), -20.0]], dtype=F64)
    ref = torch.tensor([[math.log(0.25), math.log(0.4), -5.0]], dtype=F64)  # token 2: log r = 15, k3 = e^15 − 16
    for alias, name in (("kl", "k1"), ("mse", "k2")):
        assert torch.equal(KL_ESTIMATORS.get(alias)(logp, ref), KL_ESTIMATORS.get(name)(logp, ref)), alias
    k3 = KL_ESTIMATORS.get("k3")(logp, ref)
    _close(k3[0, 2:], [math.exp(15) - 16])
    _close(KL_ESTIMATORS.get("low_var_kl")(logp, ref), [[k3[0, 0].item(), k3[0, 1].item(), 10.0]])
    for name in ("kl", "mse", "low_var_kl", "abs"):
        KLConfig(estimator=name)  # accepted by the config check


def test_kl_log_ratio_is_clamped():
    # log r = 0 − (−100) = 100 → clamped to 20: k3 = e^20 − 21, finite; masked padding stays 0
    kl = compute_kl(torch.tensor([[-100.0, NAN]]), torch.tensor([[0.0, NAN]]), torch.tensor([[1, 0]]), "k3")
    _close(kl, [[math.exp(20) - 21, 0.0]])


def test_adaptive_kl_controller_update():
    ctl = build_kl_controller(KLConfig(controller="adaptive", coef=0.1, target=6.0, horizon=10000))
    ctl.update(current_kl=9.0, n_steps=1000)
    # error = 9/6 − 1 = 0.5 → clipped to 0.2; β = 0.1·(1 + 0.2·1000/10000) = 0.102
    assert ctl.value == pytest.approx(0.102)
    ctl.update(current_kl=5.4, n_steps=500)
    # error = 5.4/6 − 1 = −0.1; β = 0.102·(1 − 0.1·500/10000) = 0.102·0.995 = 0.10149
    assert ctl.value == pytest.approx(0.10149)
    restored = KL_CONTROLLERS.get("adaptive")(coef=1.0, target=6.0, horizon=10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value

    fixed = build_kl_controller(KLConfig(coef=0.05))
    fixed.update(current_kl=100.0, n_steps=1000)
    assert fixed.value == 0.05


def test_clipped_value_loss():
    # ε = 0.2. token a: V 1.0, V_old 0.5, R 1.2: (V−R)² = 0.04, V_clip = 0.7 → 0.25; 0.5·0.25 = 0.125, clipped
    # token b: V 0.6, V_old 0.5, R 0: inside the clip, both 0.36 → 0.18, gradient V − R = 0.6
    # token c: V 0.0, V_old 0.5, R 1.0: (V−R)² = 1, V_clip = 0.3 → 0.49; 0.5·1 = 0.5, gradient V − R = −1
    mask = torch.tensor([[1, 1], [1, 0]])
    v = torch.tensor([[1.0, 0.6], [0.0, NAN]], dtype=F64, requires_grad=True)
    v_old = torch.tensor([[0.5, 0.5], [0.5, NAN]], dtype=F64)
    ret = torch.tensor([[1.2, 0.0], [1.0, NAN]], dtype=F64)
    loss, stats = clipped_value_loss(v, v_old, ret, mask, ValueLossConfig(clip_eps=0.2))
    _close(loss.detach(), [[0.125, 0.18], [0.5, 0.0]])
    _close(stats["vf_clip_frac"], [[1.0, 0.0], [0.0, 0.0]])
    loss.sum().backward()
    _close(v.grad, [[0.0, 0.6], [-1.0, 0.0]])


def test_actor_loss_mat_adds_kl_and_entropy_terms():
    cfg = AlgoConfig(kl=KLConfig(estimator="k1", coef=0.1), entropy=EntropyConfig(coef=0.01))
    mask = torch.tensor([[1, 0]])
    logp = torch.tensor([[0.0, NAN]], dtype=F64)  # ρ = 1 against old = 0
    ref = torch.tensor([[-0.5, NAN]], dtype=F64)  # k1 = logp − ref = 0.5
    ent = torch.tensor([[2.0, NAN]], dtype=F64)
    adv = torch.tensor([[1.0, NAN]], dtype=F64)
    loss, stats = actor_loss_mat(logp, torch.zeros_like(logp), adv, mask, cfg, ref_logprobs=ref, entropy=ent,
                                 kl_coef=0.2)
    # −A·ρ + β·k1 − c·H = −1 + 0.2·0.5 − 0.01·2 = −0.92 (β from the controller, not cfg.kl.coef)
    _close(loss, [[-0.92, 0.0]])
    _close(stats["kl"], [[0.5, 0.0]])
    _close(stats["entropy"], [[2.0, 0.0]])
    with pytest.raises(ValueError, match="ref_logprobs"):
        actor_loss_mat(logp, torch.zeros_like(logp), adv, mask, cfg, entropy=ent)


def test_unknown_loss_and_estimator_names_list_valid_ones():
    with pytest.raises(ValueError, match="valid names: clip_higher, dual_clip, gspo, ppo_clip"):
        POLICY_LOSSES.get("ppo")
    with pytest.raises(ValueError, match="valid names: abs, k1, k2, k3, kl, low_var_kl, mse"):
        KL_ESTIMATORS.get("k4")
    with pytest.raises(ValueError, match="valid names: adaptive, fixed"):
        KL_CONTROLLERS.get("pid")


def test_a_policy_loss_that_declares_needs_gets_them_as_keyword_arguments():
    if "test_ref_pull" not in POLICY_LOSSES:
        @POLICY_LOSSES.register("test_ref_pull", needs=("ref_logprobs", "values"))
        def ref_pull(logprobs, old_logprobs, advantages, mask, cfg, *, ref_logprobs, values):
            """(log π − log π_ref)² · V per token: reads both declared inputs."""
            return ((logprobs - ref_logprobs) ** 2 * values) * mask, {}

    mask = torch.tensor([[1.0, 1.0, 0.0]])
    logp, ref, values = torch.tensor([[-1.0, -2.0, 0.0]]), torch.tensor([[-1.5, -1.0, 0.0]]), torch.tensor([[2.0, 3.0, 0.0]])
    cfg = AlgoConfig(policy_loss=PolicyLossConfig(name="test_ref_pull"), kl=KLConfig(use_in_loss=False))
    loss, _ = actor_loss_mat(logp, logp, torch.zeros(1, 3), mask, cfg, ref_logprobs=ref, values=values)
    _close(loss, [[0.25 * 2.0, 1.0 * 3.0, 0.0]])
    with pytest.raises(ValueError, match="policy loss 'test_ref_pull' needs values"):
        actor_loss_mat(logp, logp, torch.zeros(1, 3), mask, cfg, ref_logprobs=ref)

"""Advantage estimators on small hand-worked batches (ragged masks, one-member groups)."""
import math

import pytest
import torch

from hybridflow_mg.algos import (
    ADVANTAGES,
    AdvantageConfig,
    AdvantageInput,
    compute_advantages,
    token_rewards_from_scores,
)

NAN = float("nan")
F64 = torch.float64


def _t(rows):
    return torch.tensor(rows, dtype=F64)


def _outcome_input(scores, lengths, group_index=None, baseline=None, resp_len=3):
    """One score per sequence, placed on its last valid token."""
    mask = torch.tensor([[1] * n + [0] * (resp_len - n) for n in lengths])
    rewards = token_rewards_from_scores(_t(scores), mask)
    groups = None if group_index is None else torch.tensor(group_index)
    base = None if baseline is None else _t(baseline)
    return AdvantageInput(token_rewards=rewards, response_mask=mask, group_index=groups, baseline_scores=base)


def _expect_broadcast(adv, seq_values, lengths):
    want = torch.zeros_like(adv)
    for i, (v, n) in enumerate(zip(seq_values, lengths)):
        want[i, :n] = v
    torch.testing.assert_close(adv, want, atol=1e-9, rtol=0)


def test_token_rewards_from_scores_places_score_on_last_token_and_subtracts_kl():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    kl = _t([[0.2, 0.0, 0.4], [0.6, 0.1, NAN], [NAN, NAN, NAN]])
    rewards = token_rewards_from_scores(_t([4.0, 2.0, 9.0]), mask, kl=kl, kl_coef=0.5)
    # row 0: [−0.5·0.2, 0, 4 − 0.5·0.4]; row 1: [−0.3, 2 − 0.05, pad]; row 2 has no token: no score.
    torch.testing.assert_close(rewards, _t([[-0.1, 0.0, 3.8], [-0.3, 1.95, 0.0], [0.0, 0.0, 0.0]]))


def test_gae_matches_hand_unrolled_recursion_and_ignores_padding():
    # γ = 0.9, λ = 0.8 → γλ = 0.72. Row 1's last token is padding holding garbage (99 reward, NaN value).
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards = _t([[0.0, 0.0, 1.0], [0.0, 2.0, 99.0]])
    values = _t([[0.5, 0.4, 0.6], [1.0, 0.5, NAN]])
    inp = AdvantageInput(token_rewards=rewards, response_mask=mask, values=values)
    adv, ret = ADVANTAGES.get("gae")(inp, AdvantageConfig(estimator="gae", gamma=0.9, lam=0.8, gae_whiten=False))
    # row 0: δ2 = 1 + 0 − 0.6 = 0.4                A2 = 0.4
    #        δ1 = 0 + 0.9·0.6 − 0.4 = 0.14         A1 = 0.14 + 0.72·0.4 = 0.428
    #        δ0 = 0 + 0.9·0.4 − 0.5 = −0.14        A0 = −0.14 + 0.72·0.428 = 0.16816
    # row 1: δ1 = 2 + 0.9·0 − 0.5 = 1.5 (the padded next step is terminal)   A1 = 1.5
    #        δ0 = 0 + 0.9·0.5 − 1.0 = −0.55       A0 = −0.55 + 0.72·1.5 = 0.53
    torch.testing.assert_close(adv, _t([[0.16816, 0.428, 0.4], [0.53, 1.5, 0.0]]))
    # returns = A + V on valid tokens, 0 on padding
    torch.testing.assert_close(ret, _t([[0.66816, 0.828, 1.0], [1.53, 2.0, 0.0]]))

    white, ret_w = ADVANTAGES.get("gae")(inp, AdvantageConfig(estimator="gae", gamma=0.9, lam=0.8, eps=1e-6))
    raw = torch.tensor([0.16816, 0.428, 0.4, 0.53, 1.5], dtype=F64)
    expect = (raw - raw.mean()) / (raw.std() + 1e-6)  # torch.std is the unbiased (n − 1) one
    torch.testing.assert_close(white[mask.bool()], expect)
    assert white[1, 2] == 0
    torch.testing.assert_close(ret_w, ret)  # returns come from the raw advantages


def test_gae_skips_an_interior_masked_token():
    # γ = 0.5, λ = 1, V = 0: token 1 is masked out, so token 0 links straight to token 2.
    inp = AdvantageInput(token_rewards=_t([[0.0, 7.0, 1.0]]), response_mask=torch.tensor([[1, 0, 1]]),
                         values=torch.zeros(1, 3, dtype=F64))
    adv, _ = ADVANTAGES.get("gae")(inp, AdvantageConfig(estimator="gae", gamma=0.5, lam=1.0, gae_whiten=False))
    torch.testing.assert_close(adv, _t([[0.5, 0.0, 1.0]]))  # A2 = 1, A0 = 0 + 0.5·0 − 0 + 0.5·1


# Groups: id 7 = {1, 2, 6} (size 3), id 3 = {0, 4} (size 2), id 9 = {5} (size 1); ragged lengths.
SCORES = [1.0, 0.0, 2.0, 5.0, 4.0, 6.0]
GROUPS = [7, 3, 7, 9, 3, 7]
LENGTHS = [3, 1, 2, 3, 2, 1]


def test_grpo_uses_unbiased_group_std_and_zero_for_one_member_groups():
    adv, ret = compute_advantages(_outcome_input(SCORES, LENGTHS, GROUPS), AdvantageConfig(estimator="grpo"))
    # group 7: mean 3, deviations (−2, −1, 3), Σ² = 14, unbiased var 14/2 = 7, std √7
    # group 3: mean 2, deviations (−2, 2), Σ² = 8, var 8/1 = 8, std 2√2
    # group 9: one member → 0
    s7, s3 = math.sqrt(7) + 1e-6, math.sqrt(8) + 1e-6
    _expect_broadcast(adv, [-2 / s7, -2 / s3, -1 / s7, 0.0, 2 / s3, 3 / s7], LENGTHS)
    torch.testing.assert_close(ret, adv)


def test_dr_grpo_only_centres():
    adv, _ = compute_advantages(_outcome_input(SCORES, LENGTHS, GROUPS),
                                AdvantageConfig(estimator="grpo", norm_by_std=False))
    _expect_broadcast(adv, [-2.0, -2.0, -1.0, 0.0, 2.0, 3.0], LENGTHS)


def test_grpo_equal_scores_give_zero_not_nan():
    adv, _ = compute_advantages(_outcome_input([1.0, 1.0, 1.0], [3, 2, 1], [0, 0, 0]), AdvantageConfig())
    assert torch.equal(adv, torch.zeros_like(adv))


def test_rloo_subtracts_the_mean_of_the_other_members():
    adv, _ = compute_advantages(_outcome_input(SCORES, LENGTHS, GROUPS), AdvantageConfig(estimator="rloo"))
    # group 7 (1, 2, 6): 1 − (2+6)/2 = −3, 2 − (1+6)/2 = −1.5, 6 − (1+2)/2 = 4.5
    # group 3 (0, 4): 0 − 4 = −4, 4 − 0 = 4; group 9: no other member → 0
    _expect_broadcast(adv, [-3.0, -4.0, -1.5, 0.0, 4.0, 4.5], LENGTHS)


def test_reinforce_plus_plus_discounts_then_whitens_over_valid_tokens():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    kl = _t([[0.2, 0.0, 0.0], [0.0, 0.4, NAN]])
    rewards = token_rewards_from_scores(_t([4.0, 2.0]), mask, kl=kl, kl_coef=0.5)
    # token rewards: row 0 (−0.1, 0, 4), row 1 (0, 2 − 0.2 = 1.8)
    inp = AdvantageInput(token_rewards=rewards, response_mask=mask)
    adv, ret = compute_advantages(inp, AdvantageConfig(estimator="reinforce_plus_plus", gamma=0.5))
    # γ = 0.5: row 0 G = (−0.1 + 0.5·2, 0 + 0.5·4, 4) = (0.9, 2, 4); row 1 G = (0 + 0.5·1.8, 1.8) = (0.9, 1.8)
    torch.testing.assert_close(ret, _t([[0.9, 2.0, 4.0], [0.9, 1.8, 0.0]]))
    # valid G: mean 9.6/5 = 1.92; deviations (−1.02, 0.08, 2.08, −1.02, −0.12); Σ² = 6.428; std √(6.428/4)
    std = math.sqrt(6.428 / 4) + 1e-6
    torch.testing.assert_close(adv, _t([[-1.02 / std, 0.08 / std, 2.08 / std], [-1.02 / std, -0.12 / std, 0.0]]))


def test_reinforce_plus_plus_baseline_centres_per_group_then_whitens():
    inp = _outcome_input([1.0, 3.0, 5.0], [2, 1, 3], [0, 0, 1])
    adv, _ = compute_advantages(inp, AdvantageConfig(estimator="reinforce_plus_plus_baseline"))
    # s − group mean: (−1, 1, 0) → tokens (−1, −1 | 1 | 0, 0, 0); mean −1/6;
    # deviations (−5/6, −5/6 | 7/6 | 1/6 ×3); Σ² = (25 + 25 + 49 + 3)/36 = 102/36; std √(102/36/5)
    std = math.sqrt(102 / 36 / 5) + 1e-6
    a, b, c = -5 / 6 / std, 7 / 6 / std, 1 / 6 / std
    torch.testing.assert_close(adv, _t([[a, a, 0.0], [b, 0.0, 0.0], [c, c, c]]))


def test_remax_subtracts_the_greedy_score():
    inp = _outcome_input([3.0, 1.0], [3, 1], baseline=[2.5, 1.5])
    adv, _ = compute_advantages(inp, AdvantageConfig(estimator="remax"))
    _expect_broadcast(adv, [0.5, -0.5], [3, 1])


@pytest.mark.parametrize("estimator, missing", [("gae", "values"), ("grpo", "group_index"),
                                                ("rloo", "group_index"), ("remax", "baseline_scores")])
def test_missing_input_is_named(estimator, missing):
    with pytest.raises(ValueError, match=missing):
        compute_advantages(_outcome_input([1.0], [2]), AdvantageConfig(estimator=estimator))


def test_unknown_estimator_lists_valid_names():
    with pytest.raises(ValueError, match=r"did you mean 'grpo'.*valid names: gae, grpo, reinforce_plus_plus"):
        ADVANTAGES.get("grpoo")

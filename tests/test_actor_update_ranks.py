"""Issue 6: the actor update at (t,p,d) = (2,1,2) and (1,2,2) gives the loss and gradient norm of (1,1,1)
on the same batch (PPO clip + KL + entropy, dynamic micro-batches, DP-split with global normalizers)."""
import json
import os

import pytest

from tests.multirank import SHARED, assert_rank_check


def _result(name):
    with open(os.path.join(SHARED, f"update_{name}.json")) as f:
        return json.load(f)


def test_reference_update_on_one_rank():
    assert_rank_check("tests.ranks.update1", 1, "actor_update_at_1_1_1")


@pytest.mark.parametrize("check,name", [("actor_update_at_2_1_2", "212"), ("actor_update_at_1_2_2", "122")])
def test_update_equals_the_reference(check, name):
    assert_rank_check("tests.ranks.update1", 1, "actor_update_at_1_1_1")
    assert_rank_check("tests.ranks.update4", 4, check)
    ref, got = _result("111"), _result(name)
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6, abs=1e-7)
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    assert got["tokens"] == ref["tokens"]
    assert got["kl"] == pytest.approx(ref["kl"], rel=1e-6)


def test_policy_update_moves_towards_the_advantage():
    assert_rank_check("tests.ranks.update1", 1, "policy_update_moves_towards_the_advantage")

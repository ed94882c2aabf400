"""The Trainer on 2 gloo ranks (TP1 × DP2, vLLM TP1 × 2), built from the quickstart preset, shortened.

- ReMax (`algo.advantage.estimator=remax`) runs 3 steps, and every sample's advantage is its score
  minus the score of a greedy answer to its prompt, checked against an independent greedy generation.
- An estimator registered in a user file named by `run.imports`, declaring it needs values, gets a
  critic that trains.
- `state_dict()` / `load_state_dict()` hold the whole training state: a step replayed from a snapshot
  gives the same metrics and the same actor weights.
"""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.distributed as dist

from hybridflow_mg import Callback, Trainer
from hybridflow_mg.metrics.tracker import depends_on_wall_clock
from tests.multirank import ROOT, SHARED, rank_check
from tests.tiny import on_rank0_then_barrier

QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
SHORT = ["parallel.train.tp=1", "model.synthetic.num_warm_start=256", "model.synthetic.num_train=32",
         "model.synthetic.num_val=8", "data.prompts_per_step=8", "rollout.n=4", "actor.warm_start.steps=25",
         "trainer.val_every=0", "trainer.save_final=false"]


def _trainer(name: str, *overrides: str, **kwargs) -> Trainer:
    return Trainer.from_yaml(QUICKSTART, overrides=[*SHORT, f"run.output_dir={SHARED}/trainer2", f"run.name={name}",
                                                   *overrides], **kwargs)


def _rows(name: str) -> list[dict]:
    with open(os.path.join(SHARED, "trainer2", name, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


class _RemaxCheck(Callback):
    """At the end of training (the trainer still open): one more step's stages by hand, checked."""

    def on_train_end(self, trainer):
        from hybridflow_mg.trainer.stages import advantages, generate, old_logprobs, score

        run = trainer.run
        assert run.engine.num_decodable_ids == run.tokenizer.vocab_size  # the rollout never samples past it
        batch = next(run.train_batches)
        run.hybrid.sync_weights()
        with run.hybrid.generating():
            rollouts = generate(run, batch, step=99)
        rewards = score(run, rollouts)
        adv = advantages(run, rollouts.seqs, rewards, old_logprobs=old_logprobs(run, rollouts.seqs),
                         ref_logprobs=None, values=None)
        mask = rollouts.seqs.response_mask.bool()
        expected = (rewards.scores - rewards.baseline_scores).unsqueeze(1).expand_as(mask)
        assert torch.equal(adv.advantages[mask], expected[mask].float()), "advantage ≠ score − greedy score"
        assert torch.all(adv.advantages[~mask] == 0)
        # the baseline is the score of the greedy answer to each sample's prompt: generate it independently
        trainer._vllm_step = None  # force a fresh reshard, as an evaluator between steps would get
        greedy = trainer.generate([it.prompt_ids for it in batch.items])
        from hybridflow_mg.trainer.stages import decode_response

        samples = trainer.sample([it.prompt_ids for it in batch.items])  # the same answers, with tokens and finish
        assert [[decode_response(run.tokenizer, s.token_ids) for s in c.samples] for c in samples] == greedy
        assert {s.finish_reason for c in samples for s in c.samples} <= {"stop", "length"}
        by_prompt = trainer.score([g[0] for g in greedy], [it.ground_truth for it in batch.items],
                                  [it.data_source for it in batch.items])
        want = torch.tensor([by_prompt[int(g)] for g in rollouts.seqs.group])
        assert torch.equal(rewards.baseline_scores, want), (rewards.baseline_scores, want)
        varied = torch.tensor([float(len(set(rewards.scores.tolist() + want.tolist())) > 1)])
        dist.all_reduce(varied, op=dist.ReduceOp.MAX)  # on some rank, scores differ: the check is not vacuous
        assert varied.item() == 1.0, "degenerate: every score and baseline is equal"
        self.checked = int(mask.any(1).sum())


@rank_check
def remax_runs_three_steps_and_uses_the_greedy_score_as_baseline():
    check = _RemaxCheck()
    # partial credit by answer length: scores and greedy baselines vary from the start, no long warm start needed
    trainer = _trainer("remax", "algo.advantage.estimator=remax", "trainer.total_steps=3", callbacks=[check],
                       reward_fn=lambda solution, ground_truth, **_: 1.0 / (1 + abs(len(solution) - len(ground_truth))))
    trainer.fit()
    assert check.checked > 0
    if dist.get_rank() == 0:
        rows = _rows("remax")
        assert [r["step"] for r in rows] == [1, 2, 3] and all("reward_baseline_mean" in r for r in rows)


USER_ESTIMATOR = '''
import torch
from hybridflow_mg.algos import ADVANTAGES


@ADVANTAGES.register("score_minus_value", needs=("values",))
def score_minus_value(inp, cfg):
    """A one-step actor-critic baseline: the sequence score minus the critic's value, per token."""
    mask = inp.mask()
    returns = inp.scores().unsqueeze(1).expand(mask.shape) * mask
    return (returns - inp.values) * mask, returns
'''


class _Roles(Callback):
    """What the run built, and the critic's weights before and after training."""

    def on_train_start(self, trainer):
        self.needs, critic = trainer.run.needs, trainer.run.critic
        self.before = [p.detach().clone() for c in critic.modules for p in c.parameters()] if critic else None

    def on_train_end(self, trainer):
        self.after = [p.detach().clone() for c in trainer.run.critic.modules for p in c.parameters()]


@rank_check
def an_estimator_from_run_imports_that_needs_values_gets_a_critic():
    path = os.path.join(SHARED, "my_estimators.py")
    on_rank0_then_barrier(lambda: open(path, "w").write(USER_ESTIMATOR))
    roles = _Roles()
    trainer = _trainer("user_estimator", f"run.imports=[{path}]", "algo.advantage.estimator=score_minus_value",
                       "trainer.total_steps=2", "actor.warm_start.steps=0", callbacks=[roles],
                       reward_fn=lambda solution, ground_truth, **_: 0.1 * len(solution))  # varies from step 1
    metrics = trainer.fit()
    assert roles.before is not None and "values" in roles.needs  # a critic was built
    assert not all(torch.equal(a, b) for a, b in zip(roles.before, roles.after)), "the critic did not train"
    assert metrics["critic/grad_norm"] > 0


@rank_check
def state_dict_holds_the_whole_training_state():
    def params(t):
        return [p.detach().clone() for c in t.run.actor.modules for p in c.parameters()]

    with _trainer("state", "algo.kl.use_in_loss=true", "algo.kl.controller=adaptive", "algo.kl.horizon=100",
                  "actor.warm_start.steps=0") as trainer:
        trainer.setup()
        trainer.train_step()
        snapshot = copy.deepcopy(trainer.state_dict())
        first = trainer.train_step()
        weights, coef = params(trainer), trainer.run.kl_controller.value
        trainer.load_state_dict(snapshot)
        assert trainer.step == 1 and trainer.run.kl_controller.value != coef
        again = trainer.train_step()
        replayed = params(trainer)
        # between steps vLLM holds the policy of the step before: validate() reshards first
        assert trainer._vllm_step == 1 and "val_reward" in trainer.validate() and trainer._vllm_step == 2
        trainer.register_evaluator(lambda t: {"reward_mean": 0.0}, name="clash", every=1)
        with pytest.raises(ValueError, match="'reward_mean', a metric of the step itself"):
            trainer.train_step()
    same = lambda m: {k: v for k, v in m.items() if not depends_on_wall_clock(k)}  # noqa: E731
    assert same(again) == same(first), {k: (first[k], again.get(k)) for k in same(first) if first[k] != again.get(k)}
    assert trainer.step == 2 and all(torch.equal(a, b) for a, b in zip(weights, replayed))

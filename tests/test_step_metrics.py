"""The step's batch metrics against hand-worked numbers: truncation rate from vLLM's finish reasons, token
counts, the monitored KL to the reference (k1 and k3 by hand), and tokens per second from counts and seconds."""
import math
from types import SimpleNamespace

import torch
import torch.distributed as dist

from hybridflow_mg.data.datasets import PromptBatch, PromptItem
from hybridflow_mg.rollout.vllm_engine import Completion, Sample
from hybridflow_mg.trainer.batch import Experience
from hybridflow_mg.trainer.loop import throughput
from hybridflow_mg.trainer.stages import Rewards, _rollouts, step_metrics

EOS = 2


def _run(estimator: str):
    grid = SimpleNamespace(layout=SimpleNamespace(dp=1), train=SimpleNamespace(dp=0), device=torch.device("cpu"),
                           dp_group=None)
    tokenizer = SimpleNamespace(eos_id=EOS, decode=lambda ids: " ".join(map(str, ids)))
    cfg = SimpleNamespace(algo=SimpleNamespace(kl=SimpleNamespace(estimator=estimator)))
    return SimpleNamespace(grid=grid, tokenizer=tokenizer, cfg=cfg, kl_controller=SimpleNamespace(value=0.05))


def _rollouts_of_two_prompts(run):
    """Prompt 0 (3 tokens): a stopped 2-token answer and a truncated 4-token one; prompt 1 (5 tokens): a
    truncated 4-token answer and a stopped 1-token one (the stop token alone)."""
    batch = PromptBatch(items=[PromptItem(index=0, prompt_ids=[5, 6, 7], ground_truth="1", data_source="d"),
                               PromptItem(index=1, prompt_ids=[5, 6, 7, 8, 9], ground_truth="2", data_source="d")])
    stop = lambda ids: Sample(token_ids=ids, logprobs=[-0.5] * len(ids), finish_reason="stop", stop_token_id=EOS)
    length = lambda ids: Sample(token_ids=ids, logprobs=[-1.0] * len(ids), finish_reason="length")
    completions = [Completion(prompt_token_ids=[5, 6, 7], samples=[stop([11, EOS]), length([12, 13, 14, 15])]),
                   Completion(prompt_token_ids=[5, 6, 7, 8, 9], samples=[length([16, 17, 18, 19]), stop([EOS])])]
    return _rollouts(run, batch, completions)


def _experience(r, old, ref):
    zeros = torch.zeros_like(old)
    return Experience.of(r.seqs, old_logprobs=old, ref_logprobs=ref, advantages=zeros, returns=zeros,
                         loss_mask=r.seqs.response_mask)


def test_truncation_tokens_and_monitored_kl(tmp_path):
    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for estimator in ("k1", "k3"):
            run = _run(estimator)
            r = _rollouts_of_two_prompts(run)
            assert r.truncated.tolist() == [False, True, True, False]
            mask = r.seqs.response_mask
            old = r.rollout_logprobs.clone()  # the actor agrees with vLLM: rollout_logprob_diff 0
            ref = torch.where(mask.bool(), old - 0.25, torch.zeros_like(old))  # log π_ref = log π_old − 0.25
            experience = _experience(r, old, ref)
            reshard = SimpleNamespace(recv_bytes=3e6, collectives=2)
            stats = step_metrics(run, r, Rewards(scores=torch.tensor([1.0, 0.0, 0.0, 1.0])), experience,
                                 torch.ones(4, dtype=torch.bool), reshard)
            m = stats.metrics
            assert m["truncation_rate"] == 0.5  # two of four samples hit max_new_tokens
            assert m["perf/prompt_tokens"] == 3 + 3 + 5 + 5 and m["perf/response_tokens"] == 2 + 4 + 4 + 1
            assert m["response_len"] == 11 / 4 and m["rollout_logprob_diff"] == 0.0
            # log r = log π_ref − log π_old = −0.25 on every response token
            want = 0.25 if estimator == "k1" else math.exp(-0.25) - 1 + 0.25  # k1: −log r; k3: r − 1 − log r
            assert math.isclose(m["rollout_kl"], want, rel_tol=1e-6) and stats.rollout_kl == m["rollout_kl"]
            assert (m["reward_mean"], m["reshard_mb"], m["reshard_collectives"]) == (0.5, 3.0, 2)
            no_ref = step_metrics(run, r, Rewards(scores=torch.zeros(4)), _experience(r, old, None),
                                  torch.ones(4, dtype=torch.bool), reshard)
            assert "rollout_kl" not in no_ref.metrics and no_ref.rollout_kl is None
    finally:
        if own:
            dist.destroy_process_group()


def test_throughput_from_counts_and_seconds():
    got = throughput({"perf/prompt_tokens": 300.0, "perf/response_tokens": 100.0, "seconds": 2.5,
                      "time/validate": 0.5, "time/generate": 0.5}, world=4)  # validation is not the step's work
    assert got == {"perf/tokens_per_s": 200.0, "perf/tokens_per_s_per_rank": 50.0, "perf/generate_tokens_per_s": 200.0}


def test_wall_clock_keys_are_told_apart():
    from hybridflow_mg.metrics.tracker import depends_on_wall_clock

    rates = throughput({"perf/prompt_tokens": 3.0, "perf/response_tokens": 1.0, "seconds": 1.0}, world=1)
    assert all(depends_on_wall_clock(k) for k in [*rates, "seconds", "time/generate"])
    assert not any(depends_on_wall_clock(k) for k in ("perf/prompt_tokens", "perf/response_tokens", "reward_mean",
                                                      "rollout_kl", "truncation_rate"))

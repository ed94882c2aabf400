"""What each role computes per micro-batch: heads (no grad) and losses (for `ModelWorker.train`).

All work on the last pipeline stage's output for one micro-batch (`Sequences`), at response
positions (see batch.py): column j is the model's output at the position that predicts response
token j. Log-probs and entropy come from vocab-parallel logits without gathering the vocab
(`trainer/logits.py`).
"""
from __future__ import annotations

import torch

from hybridflow_mg.algos import aggregate
from hybridflow_mg.algos.objectives import actor_loss_mat, critic_loss_mat
from hybridflow_mg.trainer.batch import Experience, Sequences
from hybridflow_mg.trainer.logits import logprobs_and_entropy, token_logprobs


def _at_responses(output: torch.Tensor, mb: Sequences) -> torch.Tensor:
    """[mb, T, ·] the output rows that predict each response token."""
    pos = mb.response_positions(mb.resp_len).to(output.device)
    return output.gather(1, pos.unsqueeze(-1).expand(-1, -1, output.size(-1)))


def _on(device, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    return tuple(None if t is None else t.to(device) for t in tensors)


def actor_head(grid, *, temperature: float = 1.0, with_entropy: bool = False, entropy_grad: bool = True):
    """{"logprobs": log π(response token)} (+ "entropy"), each [mb, T]."""
    def head(logits, mb):
        logits = _at_responses(logits, mb)
        targets = mb.responses().to(logits.device)
        if not with_entropy:
            return {"logprobs": token_logprobs(logits, targets, tp_group=grid.tp_group, tp_rank=grid.train.tp,
                                               temperature=temperature)}
        lp, h = logprobs_and_entropy(logits, targets, tp_group=grid.tp_group, tp_rank=grid.train.tp,
                                     temperature=temperature, entropy_grad=entropy_grad)
        return {"logprobs": lp, "entropy": h}
    return head


def value_head():
    """{"values": V(prefix before response token j)} [mb, T] from a value model's [mb, L, 1] output."""
    return lambda values, mb: {"values": _at_responses(values, mb)[..., 0]}


def score_head():
    """{"score": the value at each sequence's last token} [mb, 1] (a reward model's score)."""
    def head(values, mb):
        last = (mb.prompt_lens + mb.response_lens - 1).clamp(min=0).to(values.device)
        return {"score": values[torch.arange(len(mb), device=values.device), last, 0].unsqueeze(1)}
    return head


def actor_loss(grid, algo, *, num_tokens: float, num_seqs: float, kl_coef: float, temperature: float = 1.0):
    """The actor's loss per micro-batch (policy + KL + entropy), aggregated with the step's global counts."""
    need_entropy = algo.entropy.coef > 0

    head = actor_head(grid, temperature=temperature, with_entropy=True, entropy_grad=need_entropy)

    def loss(logits, mb: Experience):
        out = head(logits, mb)
        mask, old, adv, ref, values = _on(logits.device, mb.loss_mask, mb.old_logprobs, mb.advantages,
                                          mb.ref_logprobs, mb.values)
        loss_mat, stats = actor_loss_mat(out["logprobs"], old, adv, mask, algo, ref_logprobs=ref, values=values,
                                         kl_coef=kl_coef, entropy=out["entropy"])
        value = aggregate(loss_mat, mask, algo.policy_loss.agg_mode, num_tokens=num_tokens, num_seqs=num_seqs)
        sums = {k: (v * mask).sum() for k, v in stats.items() if v.shape == mask.shape}
        sums["tokens"] = mask.sum()
        return value, sums
    return loss


def critic_loss(algo, *, num_tokens: float, num_seqs: float):
    """The critic's clipped value loss per micro-batch, aggregated with the step's global counts."""
    def loss(values, mb: Experience):
        values = _at_responses(values, mb)[..., 0]
        mask, old_values, returns = _on(values.device, mb.loss_mask, mb.values, mb.returns)
        loss_mat, stats = critic_loss_mat(values, old_values, returns, mask, algo.value_loss)
        value = aggregate(loss_mat, mask, algo.value_loss.agg_mode, num_tokens=num_tokens, num_seqs=num_seqs)
        sums = {k: (v * mask).sum() for k, v in stats.items() if v.shape == mask.shape}
        sums["tokens"] = mask.sum()
        return value, sums
    return loss

"""`Experience`: the typed per-token data the losses read, cut into micro-batches with its sequences."""
import torch

from hybridflow_mg.trainer.batch import Experience, Sequences


def test_experience_select_keeps_per_token_tensors_aligned_with_their_sequences():
    seqs = Sequences.build([[1, 2], [3], [4, 5, 6]], [[7, 8, 9], [10], [11, 12]], group=[0, 0, 1])
    t = torch.arange(9.0).reshape(3, 3) * seqs.response_mask
    exp = Experience.of(seqs, old_logprobs=t, advantages=-t, returns=2 * t, loss_mask=seqs.response_mask)
    sub = exp.select([1, 2])
    assert isinstance(sub, Experience) and sub.ref_logprobs is None and sub.values is None
    assert sub.tokens.tolist() == [[3, 10, 0, 0, 0], [4, 5, 6, 11, 12]]
    assert sub.old_logprobs.tolist() == [[3.0, 0.0], [6.0, 7.0]]  # trimmed to the longest response (2)
    assert torch.equal(sub.advantages, -sub.old_logprobs) and torch.equal(sub.loss_mask, sub.response_mask)

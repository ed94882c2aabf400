"""Loss aggregation: each mode by hand, and exactness under micro-batching and data parallelism."""
import pytest
import torch

from hybridflow_mg.algos import (
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    AlgoConfig,
    EntropyConfig,
    KLConfig,
    PolicyLossConfig,
    actor_loss_mat,
    aggregate,
    count_normalizers,
)

NAN = float("nan")
MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]

# row 0: 4 tokens (sum 10), row 1: 2 tokens (sum 11), row 2: empty. 6 tokens, 2 non-empty sequences.
LOSS = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, NAN, NAN], [NAN, NAN, NAN, NAN]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize("mode, local, explicit", [
    ("token-mean", (10 + 11) / 6, (10 + 11) / 12),                        # explicit num_tokens = 12
    ("seq-mean-token-sum", (10 + 11) / 2, (10 + 11) / 4),                 # explicit num_seqs = 4
    ("seq-mean-token-mean", (10 / 4 + 11 / 2) / 2, (10 / 4 + 11 / 2) / 4),
])
def test_modes_by_hand_on_ragged_masks(mode, local, explicit):
    assert aggregate(LOSS, MASK, mode).item() == pytest.approx(local)
    assert aggregate(LOSS, MASK, mode, num_tokens=12, num_seqs=4).item() == pytest.approx(explicit)
    assert aggregate(LOSS, MASK, mode, num_tokens=torch.tensor(12.0), num_seqs=torch.tensor(4)).item() == \
        pytest.approx(explicit)


@pytest.mark.parametrize("mode", MODES)
def test_all_padding_gives_zero_not_nan(mode):
    loss = aggregate(LOSS[2:], MASK[2:], mode)
    assert loss.item() == 0.0
    loss = aggregate(LOSS[2:], MASK[2:], mode, num_tokens=0, num_seqs=0)
    assert loss.item() == 0.0


def test_count_normalizers():
    counts = count_normalizers([MASK[:2], MASK[2:], MASK.bool()])
    assert counts.dtype == torch.float64
    assert counts.tolist() == [6 + 0 + 6, 2 + 0 + 2]


# A ragged batch of 6 (one empty sequence), split over two "DP ranks" into micro-batches of 2 + 1 and 2 + 1.
LENGTHS = [5, 1, 3, 0, 4, 2]
RANKS = [[slice(0, 2), slice(2, 3)], [slice(3, 5), slice(5, 6)]]


def _batch(seed=0, resp_len=5):
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1] * n + [0] * (resp_len - n) for n in LENGTHS])
    old = -torch.rand(len(LENGTHS), resp_len, generator=g, dtype=torch.float64) * 2
    logp = old + 0.3 * torch.randn(old.shape, generator=g, dtype=torch.float64)  # some tokens clip
    adv = torch.randn(old.shape, generator=g, dtype=torch.float64)
    ref = old + 0.1 * torch.randn(old.shape, generator=g, dtype=torch.float64)
    ent = torch.rand(old.shape, generator=g, dtype=torch.float64)
    pad = mask == 0
    return {"logp": logp.masked_fill(pad, NAN), "old": old.masked_fill(pad, NAN), "adv": adv.masked_fill(pad, NAN),
            "ref": ref.masked_fill(pad, NAN), "ent": ent.masked_fill(pad, NAN), "mask": mask}


def _loss(b, rows, cfg, **norm):
    """Aggregated actor loss of `rows` of batch `b`, and d loss / d logprobs of those rows."""
    logp = b["logp"][rows].clone().requires_grad_()
    ent = b["ent"][rows].clone().requires_grad_()
    mat, _ = actor_loss_mat(logp, b["old"][rows], b["adv"][rows], b["mask"][rows], cfg,
                            ref_logprobs=b["ref"][rows], entropy=ent)
    loss = aggregate(mat, b["mask"][rows], cfg.policy_loss.agg_mode, **norm)
    loss.backward()
    return loss.detach(), logp.grad, ent.grad


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(POLICY_LOSSES.names()))
def test_micro_batches_and_dp_ranks_sum_to_the_full_batch_loss(name, mode):
    extra = {"clip_eps_high": 0.28} if name == "clip_higher" else {}
    cfg = AlgoConfig(policy_loss=PolicyLossConfig(name=name, agg_mode=mode, **extra),
                     kl=KLConfig(estimator="k3", coef=0.1), entropy=EntropyConfig(coef=0.01))
    b = _batch()
    full, full_grad, full_ent_grad = _loss(b, slice(None), cfg)

    # Each rank counts its own micro-batches; the sum over ranks stands in for the DP all-reduce.
    counts = sum(count_normalizers([b["mask"][s] for s in slices]) for slices in RANKS)
    num_tokens, num_seqs = counts.tolist()
    assert (num_tokens, num_seqs) == (sum(LENGTHS), 5)
    total, grads, ent_grads = 0.0, [], []
    for slices in RANKS:
        for s in slices:
            loss, grad, ent_grad = _loss(b, s, cfg, num_tokens=num_tokens, num_seqs=num_seqs)
            total, grads, ent_grads = total + loss, grads + [grad], ent_grads + [ent_grad]
    torch.testing.assert_close(total, full, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.cat(grads), full_grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.cat(ent_grads), full_ent_grad, atol=1e-6, rtol=0)
    assert torch.isfinite(full_grad).all()


def test_local_normalizers_are_not_exact():
    """Why the global normalizers exist: averaging per-micro-batch token-means is a different loss."""
    cfg = AlgoConfig(kl=KLConfig(use_in_loss=False))
    b = _batch()
    full, _, _ = _loss(b, slice(None), cfg)
    naive = sum(_loss(b, s, cfg)[0] for slices in RANKS for s in slices) / 4
    assert abs((naive - full).item()) > 1e-3


def test_unknown_mode_lists_valid_ones():
    with pytest.raises(ValueError, match="valid names: seq-mean-token-mean, seq-mean-token-sum, token-mean"):
        aggregate(LOSS, MASK, "seq-mean")
    assert sorted(LOSS_AGGREGATIONS) == sorted(MODES)

"""The RL batch of one data-parallel rank: sequences for the models, per-response-token tensors for the losses.

`Sequences` holds the tokens; `Experience` adds the per-token quantities the losses read (old
log-probs, advantages, returns, ...), each a typed field.

Layout. Every sample is `prompt + response`, right-padded into `tokens` [B, L]. Per-token RL
quantities (log-probs, values, advantages, masks) are [B, T] over *response* positions: column j
is response token j, predicted by the model at absolute position prompt_len + j − 1. Right padding
keeps causal attention exact for the real tokens without any attention mask.

Micro-batches are picked by a token budget (sequences × padded length) — dynamic batching — and
padded to their own longest sequence; the losses stay exact because aggregation uses the whole
step's global normalizers (algos/aggregation.py), not per-micro-batch means.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class Sequences:
    """B sequences (one per sample) and the per-response-token tensors computed for them."""

    tokens: torch.Tensor
    """[B, L] prompt + response token ids, right-padded with 0."""
    prompt_lens: torch.Tensor
    """[B] prompt lengths."""
    response_lens: torch.Tensor
    """[B] response lengths (≥ 0)."""
    group: torch.Tensor
    """[B] index of each sample's prompt in the global batch (GRPO groups)."""

    @classmethod
    def build(cls, prompts: list[list[int]], responses: list[list[int]], group: list[int]) -> "Sequences":
        lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
        tokens = torch.zeros(len(prompts), max(lengths, default=1), dtype=torch.long)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            tokens[i, :len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        return cls(tokens=tokens, prompt_lens=torch.tensor([len(p) for p in prompts]),
                   response_lens=torch.tensor([len(r) for r in responses]), group=torch.tensor(group))

    def __len__(self) -> int:
        return self.tokens.size(0)

    @property
    def resp_len(self) -> int:
        """T: the longest response."""
        return int(self.response_lens.max()) if len(self) else 0

    @property
    def response_mask(self) -> torch.Tensor:
        """[B, T] 1.0 on real response tokens."""
        return (torch.arange(self.resp_len) < self.response_lens.unsqueeze(1)).float()

    def responses(self) -> torch.Tensor:
        """[B, T] the response token ids (0 on padding)."""
        return self.tokens.gather(1, self.response_positions(self.resp_len, offset=1))

    def response_positions(self, width: int, offset: int = 0) -> torch.Tensor:
        """[B, width] absolute positions prompt_len − 1 + j + offset (the position predicting response
        token j when offset is 0), clamped into the sequence."""
        pos = self.prompt_lens.unsqueeze(1) - 1 + offset + torch.arange(width)
        return pos.clamp(0, self.tokens.size(1) - 1)

    def select(self, rows: list[int] | torch.Tensor) -> "Sequences":
        """The sub-batch of `rows`, trimmed to its own longest sequence."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        prompt, resp = self.prompt_lens[rows], self.response_lens[rows]
        length = int((prompt + resp).max()) if len(rows) else 1
        return Sequences(tokens=self.tokens[rows, :length], prompt_lens=prompt, response_lens=resp,
                         group=self.group[rows])


@dataclass
class Experience(Sequences):
    """This rank's samples of one step with everything the actor and critic losses read: PPO's
    "experience". Per-token tensors are [B, T] fp32 over response positions (T = `resp_len`), 0 on
    padding; `select` keeps them aligned with the sequences when the worker cuts micro-batches."""

    old_logprobs: torch.Tensor
    """[B, T] fp32 log π_old(y_t): the actor's log-probs of the sampled tokens before the update."""
    advantages: torch.Tensor
    """[B, T] fp32 advantage of every response token."""
    returns: torch.Tensor
    """[B, T] fp32 the critic's regression target (gae); the advantages for outcome estimators."""
    loss_mask: torch.Tensor
    """[B, T] fp32 1 on the tokens that enter the losses: the response mask, minus the groups DAPO's
    dynamic sampling dropped."""
    ref_logprobs: torch.Tensor | None = None
    """[B, T] fp32 log π_ref(y_t), when the run has a reference model."""
    values: torch.Tensor | None = None
    """[B, T] fp32 the critic's V(s_t) at rollout time, when the run has a critic."""

    @classmethod
    def of(cls, seqs: Sequences, **per_token: torch.Tensor | None) -> "Experience":
        """`seqs` with the per-token tensors `per_token` (the fields above) attached."""
        return cls(**{f.name: getattr(seqs, f.name) for f in dataclasses.fields(Sequences)}, **per_token)

    def select(self, rows: list[int] | torch.Tensor) -> "Experience":
        """The sub-batch of `rows`, sequences trimmed to their longest, per-token tensors to their
        longest response."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        seqs = super().select(rows)
        width = seqs.resp_len
        per_token = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                     if f.name not in _SEQUENCE_FIELDS}
        return Experience.of(seqs, **{k: None if v is None else v[rows, :width] for k, v in per_token.items()})


_SEQUENCE_FIELDS = frozenset(f.name for f in dataclasses.fields(Sequences))


def micro_batches(seqs: Sequences, token_budget: int) -> list[list[int]]:
    """Rows grouped so that rows × padded length ≤ `token_budget` (at least one row per group).

    Rows are taken longest first, which packs tightly; the order does not change any result (see the
    module docstring). Every rank of a training replica derives the same groups from the same data.
    """
    lengths = (seqs.prompt_lens + seqs.response_lens).tolist()
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    longest = 0
    for i in order:
        if groups and (len(groups[-1]) + 1) * max(longest, lengths[i]) <= token_budget:
            groups[-1].append(i)
            longest = max(longest, lengths[i])
        else:
            groups.append([i])
            longest = lengths[i]
    return groups

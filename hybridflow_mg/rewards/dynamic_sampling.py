"""DAPO dynamic sampling: keep only the prompt groups whose responses scored differently.

With group-normalised advantages (GRPO, RLOO, DAPO) a group whose n responses all got the same score
has zero advantage everywhere: it costs a full forward/backward and teaches nothing, and it dilutes
the token-mean loss of the groups that do. DAPO drops such groups and samples more prompts until the
batch is full; this module is the drop, the refill belongs to the trainer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DynamicSamplingResult:
    """What `dynamic_sampling_mask` kept."""

    keep: "torch.Tensor"
    """[batch] bool: True for samples whose group has non-zero score variance."""
    num_groups_kept: int
    """Groups with at least two distinct scores."""
    num_groups_dropped: int
    """Groups whose scores are all equal (one-member groups included: no variance to learn from)."""

    @property
    def num_samples_kept(self) -> int:
        return int(self.keep.sum())


def dynamic_sampling_mask(
    scores: "torch.Tensor | Sequence[float]", group_ids: "torch.Tensor | Sequence[int]"
) -> DynamicSamplingResult:
    """The keep-mask of samples whose group's scores are not all identical.

    `scores` [batch] and `group_ids` [batch] (any integer labels; members of a group need not be
    adjacent). Scores are compared exactly: a group is dropped only when every score equals the
    others bit for bit, which is what rule rewards (0/1, format scores) produce.
    """
    import torch  # here, so that importing the reward rules stays free of torch

    scores = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)  # [batch]
    group_ids = torch.as_tensor(group_ids).reshape(-1)  # [batch]
    if scores.shape != group_ids.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and group_ids {tuple(group_ids.shape)} must have the same length")
    if scores.numel() == 0:
        return DynamicSamplingResult(keep=torch.zeros(0, dtype=torch.bool), num_groups_kept=0, num_groups_dropped=0)
    _, group = torch.unique(group_ids, return_inverse=True)  # [batch] dense group index
    num_groups = int(group.max()) + 1
    high = torch.full((num_groups,), -torch.inf, dtype=torch.float64).scatter_reduce(0, group, scores, "amax")
    low = torch.full((num_groups,), torch.inf, dtype=torch.float64).scatter_reduce(0, group, scores, "amin")
    varied = high > low  # [groups]
    num_kept = int(varied.sum())
    return DynamicSamplingResult(keep=varied[group], num_groups_kept=num_kept, num_groups_dropped=num_groups - num_kept)

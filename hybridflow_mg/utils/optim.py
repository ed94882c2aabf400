"""The torch optimizers inside megatron-core's optimizer wrappers."""
from __future__ import annotations

import torch


def torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside `optimizer` (a megatron-core optimizer; a ChainedOptimizer holds several)."""
    parts = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [getattr(part, "optimizer", part) for part in parts]

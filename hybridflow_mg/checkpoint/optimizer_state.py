"""Optimizer states on disk through megatron-core's `dist_checkpointing`: sharded, layout-portable.

Every rank writes its own shards of the Adam moments (and, with mixed precision, the fp32 master
weights) as one distributed checkpoint (torch.distributed.checkpoint files plus megatron's metadata);
loading maps the saved global tensors onto the loading run's shards, so a state saved at TP2·DP2
loads at TP1·PP2·DP2 or TP1·DP4. Measured here on gloo (2026-11-30): saved at TP2, loaded at TP1,
the next step trains. On GPU the distributed optimizer's sharded state goes through the same call.

The model's weights are not in it (they are in the project's own shard format, which exports to HF);
the model's sharded state dict is used only to name the optimizer's tensors by the parameters'
global keys.

One seam: megatron-core's filesystem writer collects its writer processes' results through a queue
served by a `multiprocessing` manager that it starts with the *spawn* method. A spawned process
re-imports the parent's `__main__`, and a user script without a main guard (a notebook cell, the
README example) would then run its training again inside that manager. `_fork_results_queue`
hands the writer a queue served by a forked manager instead, which imports nothing.
"""
from __future__ import annotations

import multiprocessing
from pathlib import Path


def _fork_results_queue() -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is None:
        filesystem_async._results_queue = multiprocessing.get_context("fork").Manager().Queue()


def _sharded(worker, *, loading: bool) -> dict:
    # one GPTModel per virtual-pipeline chunk; their tensors' checkpoint keys are global (layer offsets
    # included), so only the dict nesting tells chunks apart and the state loads at another vpp
    model = {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(worker.modules)}
    return {"optimizer": worker.optimizer.sharded_state_dict(model, is_loading=loading)}


def save_optimizer_state(worker, directory: str | Path) -> None:
    """Write `worker`'s optimizer state into the existing empty `directory` (collective over the world)."""
    from megatron.core import dist_checkpointing

    _fork_results_queue()
    dist_checkpointing.save(_sharded(worker, loading=False), str(directory))


def load_optimizer_state(worker, directory: str | Path) -> None:
    """Load an optimizer state saved by `save_optimizer_state` at any layout (collective)."""
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(_sharded(worker, loading=True), str(directory))
    worker.optimizer.load_state_dict(state["optimizer"])

"""Optimizer states on disk through megatron-core's `dist_checkpointing`: sharded, layout-portable.

Every rank writes its own shards of the Adam moments (and, with mixed precision, the fp32 master
weights) as one distributed checkpoint (torch.distributed.checkpoint files plus megatron's metadata);
loading maps the saved global tensors onto the loading run's shards, so a state saved at TP2·DP2
loads at TP1·PP2·DP2 or TP1·DP4. Measured here on gloo (2026-11-30): saved at TP2, loaded at TP1,
the next step trains. On GPU the distributed optimizer's sharded state goes through the same call.

The model's weights are not in it (they are in the project's own shard format, which exports to HF);
the model's sharded state dict is used only to name the optimizer's tensors by the parameters'
global keys.

Two seams, each the only one of its kind:

* megatron-core's filesystem writer collects its writer processes' results through a queue served by
  a `multiprocessing` manager that it starts with the *spawn* method. A spawned process re-imports the
  parent's `__main__`, and a user script without a main guard (a notebook cell, the README example)
  would then run its training again inside that manager. `_fork_results_queue` hands the writer a
  queue served by a forked manager instead, which imports nothing.
* megatron-core 0.19.2's distributed optimizer, loading its "fully_reshardable" state with torch's
  Adam (its fallback without TE or Apex), sets Adam's step and then copies per-parameter tensors for
  every tensor in the optimizer state, torch's per-parameter `step` included, which the loaded state
  does not carry: KeyError 'step' (seen on an H200). `_keep_adam_step` gives that copy the step
  already set, so it changes nothing. The same code gives every parameter the *same* step tensor,
  which torch's Adam then increments once per parameter at each step, so the bias correction after a
  resume was wrong (the replayed step 3 diverged on an H200: loss 3.55 against 2.88);
  `_unshare_adam_steps` gives each parameter its own copy after loading.
"""
from __future__ import annotations

import multiprocessing
from pathlib import Path

import torch

from hybridflow_mg.utils.optim import torch_optimizers


def _fork_results_queue() -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is None:
        filesystem_async._results_queue = multiprocessing.get_context("fork").Manager().Queue()


def _keep_adam_step() -> None:
    from megatron.core.optimizer import distrib_optimizer

    cls = distrib_optimizer.DistributedOptimizer
    original = getattr(cls, "_set_main_param_and_optimizer_states", None)
    if original is None or getattr(original, "keeps_adam_step", False):
        return

    def set_states(self, model_param, tensors):
        if "step" not in tensors and hasattr(self, "model_param_group_index_map"):
            group, order = self.model_param_group_index_map[model_param]
            step = self.optimizer.state.get(self.optimizer.param_groups[group]["params"][order], {}).get("step")
            if isinstance(step, torch.Tensor):
                tensors = {**tensors, "step": step.clone()}
        return original(self, model_param, tensors)

    set_states.keeps_adam_step = True
    cls._set_main_param_and_optimizer_states = set_states


def _sharded(worker, *, loading: bool) -> dict:
    # one GPTModel per virtual-pipeline chunk; their tensors' checkpoint keys are global (layer offsets
    # included), so only the dict nesting tells chunks apart and the state loads at another vpp
    model = {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(worker.modules)}
    # the distributed optimizer (GPU) in its layout-portable format: megatron-core 0.19 refuses its old default
    # (flattened shards, "ShardedTensor.flattened_range is not supported", seen on an H200); others ignore it
    return {"optimizer": worker.optimizer.sharded_state_dict(
        model, is_loading=loading, metadata={"distrib_optim_sharding_type": "fully_reshardable"})}


def save_optimizer_state(worker, directory: str | Path) -> None:
    """Write `worker`'s optimizer state into the existing empty `directory` (collective over the world)."""
    from megatron.core import dist_checkpointing

    _fork_results_queue()
    dist_checkpointing.save(_sharded(worker, loading=False), str(directory))


def load_optimizer_state(worker, directory: str | Path) -> None:
    """Load an optimizer state saved by `save_optimizer_state` at any layout (collective)."""
    from megatron.core import dist_checkpointing

    _keep_adam_step()
    state = dist_checkpointing.load(_sharded(worker, loading=True), str(directory))
    worker.optimizer.load_state_dict(state["optimizer"])
    _unshare_adam_steps(worker.optimizer)


def _unshare_adam_steps(optimizer) -> None:
    seen: set[int] = set()
    for inner in torch_optimizers(optimizer):
        for state in inner.state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                if id(step) in seen:
                    state["step"] = step.clone()
                seen.add(id(state["step"]))

"""The pieces of a `Trainer.state_dict()` that are not a component's own: RNG streams and role states.

A role's state is its model chunks' weights and its optimizer's state, for this rank's shards.
"""
from __future__ import annotations

from typing import Any, Mapping

from hybridflow_mg.utils.rng import rng_state, set_rng_state


def process_rng_state() -> dict[str, Any]:
    """Every random stream of this rank (`utils.rng`) and megatron-core's model-parallel RNG tracker."""
    state = rng_state()
    state["megatron"] = _megatron_tracker().get_states()
    return state


def set_process_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `process_rng_state` returned."""
    set_rng_state(state)
    _megatron_tracker().set_states(state["megatron"])


def _megatron_tracker():
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return get_cuda_rng_tracker()


def worker_state(worker) -> dict[str, Any]:
    """{"model": [state dict per virtual-pipeline chunk], "optimizer": the optimizer's state dict}.

    Raises NotImplementedError for megatron-core's distributed optimizer (GPU): its `state_dict()`
    leaves out the Adam moments and fp32 main parameters, which live sharded over data-parallel ranks;
    saving those is the sharded checkpoint's business.
    """
    if worker.optimizer is not None and _distributed(worker.optimizer):
        raise NotImplementedError(f"{worker.name}: the distributed optimizer's state is sharded over data-parallel "
                                  "ranks and not in state_dict(); save it with a sharded checkpoint")
    state: dict[str, Any] = {"model": [chunk.state_dict() for chunk in worker.chunks]}
    if worker.optimizer is not None:
        state["optimizer"] = worker.optimizer.state_dict()
    return state


def check_worker_state(worker, state: Mapping[str, Any]) -> None:
    """Raise ValueError when `state` cannot be loaded into `worker` (a different virtual-pipeline layout)."""
    if len(state["model"]) != len(worker.chunks):
        raise ValueError(f"{worker.name}: the state holds {len(state['model'])} model chunks, this run builds "
                         f"{len(worker.chunks)} (a different virtual-pipeline layout)")


def load_worker_state(worker, state: Mapping[str, Any]) -> None:
    """Load `worker_state`'s output in place (parameters keep their storage, which vLLM's resharder and
    DDP's buffers point into)."""
    check_worker_state(worker, state)
    for chunk, chunk_state in zip(worker.chunks, state["model"]):
        chunk.load_state_dict(chunk_state)
    if worker.optimizer is not None and "optimizer" in state:
        worker.optimizer.load_state_dict(state["optimizer"])


def _distributed(optimizer) -> bool:
    """Whether megatron-core's distributed optimizer is (part of) `optimizer`."""
    parts = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return any(type(p).__name__ == "DistributedOptimizer" for p in parts)

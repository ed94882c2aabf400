"""The pieces of a `Trainer.state_dict()` that are not a component's own: RNG streams and role states.

A role's state is its model chunks' weights and its optimizer's state, for this rank's shards. On
GPU, megatron-core's distributed optimizer keeps its parameter state sharded over data-parallel ranks
outside `state_dict()`; saving that is the checkpoint's business (`sharded_state_dict`).
"""
from __future__ import annotations

import random
from typing import Any, Mapping

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """Every random stream of this process: python, numpy, torch CPU, CUDA (all devices) and
    megatron-core's model-parallel RNG tracker."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    tracker = _megatron_tracker()
    if tracker is not None:
        state["megatron"] = tracker.get_states()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    tracker = _megatron_tracker()
    if tracker is not None and "megatron" in state:
        tracker.set_states(state["megatron"])


def _megatron_tracker():
    try:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker
    except ImportError:
        return None
    return get_cuda_rng_tracker()


def worker_state(worker) -> dict[str, Any]:
    """{"model": [state dict per virtual-pipeline chunk], "optimizer": the optimizer's state dict}."""
    state: dict[str, Any] = {"model": [chunk.state_dict() for chunk in worker.chunks]}
    if worker.optimizer is not None:
        state["optimizer"] = worker.optimizer.state_dict()
    return state


def load_worker_state(worker, state: Mapping[str, Any]) -> None:
    """Load `worker_state`'s output in place (parameters keep their storage, which vLLM's resharder and
    DDP's buffers point into)."""
    if len(state["model"]) != len(worker.chunks):
        raise ValueError(f"{worker.name}: the state holds {len(state['model'])} model chunks, this run builds "
                         f"{len(worker.chunks)} (a different virtual-pipeline layout)")
    for chunk, chunk_state in zip(worker.chunks, state["model"]):
        chunk.load_state_dict(chunk_state)
    if worker.optimizer is not None and "optimizer" in state:
        worker.optimizer.load_state_dict(state["optimizer"])

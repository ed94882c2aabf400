"""Every random stream of the process, captured and restored together (python, numpy, torch CPU, CUDA).

Used where something must not change them (vLLM's engine re-seeds all of them: `rollout/vllm_cpu`) and
where a run's state must carry them across a checkpoint (`trainer/state`).
"""
from __future__ import annotations

import random
from typing import Any, Mapping

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """{"python", "numpy", "torch", "cuda"}: the generators' states; "cuda" (one per device) is None
    without CUDA. Capturing the CUDA states initialises CUDA where it exists."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None:
        torch.cuda.set_rng_state_all(state["cuda"])

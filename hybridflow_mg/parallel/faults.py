"""Fault injection for the tests of failure handling: a rank that raises, dies, or computes NaN.

Off unless `HYBRIDFLOW_FAULT` is set, as `KIND:POINT:STEP[:RANK]`:

    raise:step:2:1         rank 1 raises RuntimeError when RL step 2 starts
    sigkill:step:4:1       rank 1 kills itself (SIGKILL) when RL step 4 starts
    sigkill:save:3:0       rank 0 kills itself during the save of step 3, after its first shard
    nan:loss:2             every rank's actor loss is NaN in step 2 (the update must be skipped)
    raise:setup:0          every rank raises during setup, once the run directory exists

Points are named where the code calls `trigger` ("setup", "step", "save", "loss"); the step is the RL step the
trainer announced with `set_step`. Leaving RANK out means every rank.
"""
from __future__ import annotations

import os
import signal

ENV = "HYBRIDFLOW_FAULT"
KINDS = ("raise", "sigkill", "nan")
_step = 0


def set_step(step: int) -> None:
    """The RL step now running (the trainer calls this as each step starts)."""
    global _step
    _step = step


def _spec() -> tuple[str, str, int, int | None] | None:
    raw = os.environ.get(ENV)
    if not raw:
        return None
    parts = raw.split(":")
    if len(parts) not in (3, 4) or parts[0] not in KINDS or not all(p.isdigit() for p in parts[2:]):
        raise ValueError(f"{ENV}={raw!r} must look like KIND:POINT:STEP[:RANK] with KIND one of {', '.join(KINDS)}")
    return parts[0], parts[1], int(parts[2]), int(parts[3]) if len(parts) == 4 else None


def trigger(point: str) -> bool:
    """At `point`, do what `HYBRIDFLOW_FAULT` asks of this rank in this step: raise, or die by SIGKILL;
    returns True for "nan" (the caller corrupts its value), False when nothing is asked."""
    spec = _spec()
    if spec is None:
        return False
    kind, where, step, rank = spec
    if where != point or step != _step or (rank is not None and rank != _rank()):
        return False
    if kind == "raise":
        raise RuntimeError(f"injected fault ({ENV}) at {point!r} in step {step}")
    if kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    return kind == "nan"


def _rank() -> int:
    from hybridflow_mg.parallel.launch import discover

    return discover().rank

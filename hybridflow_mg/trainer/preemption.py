"""Stopping a run early without losing it: signals (SLURM's `--signal`, `scancel`, Ctrl-C) and a deadline.

On SIGTERM, SIGUSR1 or SIGINT a rank only notes the request; the trainer asks `Preemption.due()` after
each step, which every rank answers together (one all-reduce), then saves a checkpoint and exits with
status 75 (`EXIT_RESUMABLE`), which a requeue script reads as "resume me". A second SIGINT interrupts
at once. The deadline is a Unix time from `SLURM_JOB_END_TIME` (set by SLURM for batch jobs) or
`HYBRIDFLOW_DEADLINE`; with `trainer.save_before_deadline=S`, the run stops once less than S seconds
plus the longest step's duration are left (judged after each step: the first step always runs).
"""
from __future__ import annotations

import os
import signal
import threading
import time

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
DEADLINE_ENV = ("SLURM_JOB_END_TIME", "HYBRIDFLOW_DEADLINE")


def deadline() -> float | None:
    """The job's end as a Unix time, when the environment says (see the module docstring)."""
    for var in DEADLINE_ENV:
        raw = os.environ.get(var, "")
        try:
            return float(raw)
        except ValueError:
            continue
    return None


class Preemption:
    """Signal handlers for the body of a `with` (main thread only; elsewhere signals keep their
    handlers), and the collective decision to stop."""

    def __init__(self, save_before_deadline: float | None = None, device: torch.device | None = None):
        self.device, self.margin = device, save_before_deadline
        """`device`: where the collective decision's flag lives (the grid's; set it once the grid exists)."""
        self.requested: str | None = None
        """The name of the first stop signal received, or "deadline"."""
        self._previous: dict = {}
        self._step_seconds = 0.0
        self._last: float | None = None  # when `due` was last asked (the deadline needs one step's duration)

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, _frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.requested = self.requested or signal.Signals(signum).name

    def due(self) -> bool:
        """Whether to stop after this step: a signal on any rank, or the deadline near (collective)."""
        now, end = time.monotonic(), deadline()
        if self._last is not None:  # from the second call on: a step has run since the last one
            self._step_seconds = max(self._step_seconds, now - self._last)
            if self.margin is not None and end is not None and self.requested is None \
                    and end - time.time() < self.margin + self._step_seconds:
                self.requested = "deadline"
        self._last = now
        flag = torch.tensor([1.0 if self.requested else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.requested is None:
            self.requested = "a signal on another rank"
        return bool(flag.item())

"""`hybridflow-mg train --nproc N` as the tests of long-run behaviour start it: a short quickstart in a
temporary run directory, through the real CLI and its local launcher."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.multirank import ROOT, worker_env

# The quickstart, short: 24 RL prompts in batches of 8 (an epoch is 3 steps), 4 samples each.
SHORT = ["model.synthetic.num_warm_start=64", "actor.warm_start.steps=4", "model.synthetic.num_train=24",
         "model.synthetic.num_val=8", "data.prompts_per_step=8", "rollout.n=4", "trainer.val_every=0"]


def command(out: Path, name: str, *overrides: str, nproc: int = 4) -> list[str]:
    return [sys.executable, "-m", "hybridflow_mg.cli", "train", "configs/quickstart.yaml", "--nproc", str(nproc),
            *SHORT, f"run.output_dir={out}", f"run.name={name}", *overrides]


def run(out: Path, name: str, *overrides: str, nproc: int = 4, fault: str | None = None, timeout: int = 600,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = worker_env(**({"HYBRIDFLOW_FAULT": fault} if fault else {}), **(env or {}))
    return subprocess.run(command(out, name, *overrides, nproc=nproc), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def start(out: Path, name: str, *overrides: str, nproc: int = 4) -> subprocess.Popen:
    """The run in the background, in a session of its own (the test can kill it all)."""
    return subprocess.Popen(command(out, name, *overrides, nproc=nproc), cwd=ROOT, env=worker_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    """Until `path` exists (the run must still be going)."""
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (status {proc.returncode}) before {path} appeared:\n"
                                 f"{proc.stderr.read()[-3000:]}")
        if time.monotonic() > end:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.2)


def kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL to the launcher and every worker (each worker runs in a process group of its own)."""
    import psutil

    family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def comparable(row: dict) -> dict:
    """A metrics row without what depends on the wall clock."""
    from hybridflow_mg.metrics.tracker import depends_on_wall_clock

    return {k: v for k, v in row.items() if not depends_on_wall_clock(k)}


def optimizer_tensors(directory) -> dict:
    """Every tensor of a dist_checkpointing optimizer state, read without a process group."""
    import torch
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict = {}
    _load_state_dict(state, storage_reader=FileSystemReader(str(directory)), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def error_lines(proc) -> list[str]:
    """The lines of our own errors in a run's stderr (libraries print warnings around them)."""
    return [line for line in proc.stderr.splitlines() if line.startswith("hybridflow-mg: error:")]


__all__ = ["ROOT", "SHORT", "command", "comparable", "error_lines", "kill_all", "optimizer_tensors", "rows", "run",
           "start", "wait_for"]

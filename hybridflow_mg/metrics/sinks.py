"""Where a run's metrics go: named sinks in a registry, chosen by `run.loggers`.

Built in: `jsonl` (metrics.jsonl, full precision, the file that run comparisons read), `console` (one
line per step), `tensorboard` (scalars, when tensorboard is installed) and `wandb` (optional; offline
unless told otherwise). A team adds its own (mlflow, a database, ...) in a module named in
`run.imports`, without touching the loop:

    import mlflow
    from hybridflow_mg.metrics.sinks import LOGGERS, MetricSink

    @LOGGERS.register("mlflow")                   # then: run.imports=[my_sinks.py] run.loggers=[jsonl,mlflow]
    class MlflowSink(MetricSink):
        def __init__(self, ctx):                  # a SinkContext: run_dir, resume_step, config
            mlflow.start_run(run_name=ctx.config.run.name)
        def log(self, step, metrics):
            mlflow.log_metrics(dict(metrics), step=step)
        def close(self):
            mlflow.end_run()

Sinks exist on the logging rank only (global rank 0); nothing here talks to other processes.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from hybridflow_mg.utils.registry import Registry


@dataclass(frozen=True)
class SinkContext:
    """What a sink is built from."""

    run_dir: Path
    """The run directory (exists); a sink writes its files under it."""
    resume_step: int | None
    """The checkpoint step this run continues from: rows after it were logged by a run that was then
    killed and are logged again; None for a fresh run."""
    config: Any
    """The run's resolved config (`TrainConfig`), or None outside a run."""
    console_keys: tuple[str, ...] = ()
    """The metrics the console line shows, in order."""


class MetricSink:
    """One destination of the per-step metrics. `log` is called once per RL step, in step order, with
    every metric of that step (floats; a non-finite one is possible, e.g. a skipped update's loss)."""

    @classmethod
    def check(cls) -> None:
        """Before anything starts (at config validation): raise a one-line ValueError when this sink cannot
        run here, e.g. a missing package."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Flush and release files or connections; called once, when the run closes."""


LOGGERS: Registry[type[MetricSink]] = Registry("logger")
"""Metric sinks by name; `run.loggers` names them, a class (or any `fn(SinkContext) -> MetricSink`) each."""


def kept_rows(path: Path, resume_step: int | None) -> list[dict]:
    """The rows of metrics.jsonl a run keeps: none for a fresh run, those of steps ≤ `resume_step` for a
    resumed one (a cut-off last line, from a killed run, is dropped)."""
    if resume_step is None or not path.is_file():
        return []
    return [r for r in map(_row, path.read_text().splitlines()) if r and r.get("step", 0) <= resume_step]


def _row(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


@LOGGERS.register("jsonl")
class JsonlSink(MetricSink):
    """`metrics.jsonl`: one JSON object per step, `{"step": N, ...}`, at full precision (comparisons of
    runs, resumes and layouts read these). A fresh run starts it afresh; a resumed run keeps the rows up
    to its checkpoint and appends after them."""

    def __init__(self, ctx: SinkContext):
        path = ctx.run_dir / "metrics.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept_rows(path, ctx.resume_step)))
        os.replace(tmp, path)
        self._file = open(path, "a", buffering=1)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")

    def close(self) -> None:
        self._file.close()


@LOGGERS.register("console")
class ConsoleSink(MetricSink):
    """`step    N  reward_mean=0.5  ...`: the context's console keys that the step has, on stdout."""

    def __init__(self, ctx: SinkContext):
        self.keys = ctx.console_keys

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        shown = "  ".join(f"{k}={metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}"
                          for k in self.keys if k in metrics)
        print(f"step {step:4d}  {shown}", flush=True)


@LOGGERS.register("tensorboard")
class TensorBoardSink(MetricSink):
    """Scalars under `tensorboard/` when tensorboard is installed (else nothing). Events after the resume
    step are purged (a fresh run: all older events of the directory), so no step is counted twice."""

    def __init__(self, ctx: SinkContext):
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(ctx.run_dir / "tensorboard"), purge_step=(ctx.resume_step or 0) + 1)
        except Exception:  # noqa: BLE001 - tensorboard is optional
            self._writer = None

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if self._writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _wandb(*, load: bool = True):
    """The optional wandb package (`load=False`: only whether it is installed). The one place it is imported."""
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        raise ValueError("the wandb logger needs the wandb package, which is not installed here: pip install wandb "
                         "(it runs offline, no account needed), or drop wandb from run.loggers")
    if load:
        import wandb

        return wandb
    return None


@LOGGERS.register("wandb")
class WandbSink(MetricSink):
    """A Weights & Biases run under `<run_dir>/wandb/`, with the resolved config. Offline by default
    (`run.wandb.mode`, else the `WANDB_MODE` environment variable, else offline): the run is written
    locally, and `wandb sync <run_dir>/wandb/offline-run-*` uploads it later from a machine with network.
    Each start of a run (a resume too) is its own W&B run, in the group `run.name`."""

    @classmethod
    def check(cls) -> None:
        _wandb(load=False)

    def __init__(self, ctx: SinkContext):
        from hybridflow_mg.config.load import to_dict
        from hybridflow_mg.config.schema import WandbConfig

        wandb = _wandb()
        run = getattr(ctx.config, "run", None)
        opts = run.wandb if run is not None else WandbConfig()
        name = run.name if run is not None else ctx.run_dir.name
        mode = opts.mode or os.environ.get("WANDB_MODE") or "offline"
        # console="off": wandb's output capture wraps sys.stdout, which the console sink (and whoever
        # reads our output) already owns; the metrics and config are what it is for here.
        self._run = wandb.init(project=opts.project, entity=opts.entity, name=name, group=name, tags=opts.tags or None,
                               dir=str(ctx.run_dir), mode=mode, config=to_dict(ctx.config) if run is not None else None,
                               settings=wandb.Settings(console="off"))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self._run.log(dict(metrics), step=step)

    def close(self) -> None:
        self._run.finish()

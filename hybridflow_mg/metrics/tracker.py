"""Per-step metrics of a run: the sinks of `run.loggers` (metrics.jsonl, a console line, TensorBoard, wandb,
or a team's own; metrics/sinks.py), the in-memory history, and a text curve of one metric at the end.

Only the logging rank (global rank 0) writes; every other rank's tracker does nothing.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Sequence

from hybridflow_mg.config.schema import DEFAULT_LOGGERS
from hybridflow_mg.metrics.sinks import LOGGERS, MetricSink, SinkContext, kept_rows


def depends_on_wall_clock(key: str) -> bool:
    """Whether the metric `key` is a time or a rate (`time/<stage>`, `seconds`, `perf/*_per_s*`): the keys
    that differ between two runs of the same seed; every other metric of a step is reproducible."""
    return key.startswith("time/") or key == "seconds" or (key.startswith("perf/") and "_per_s" in key)


class Timer:
    """Wall-clock seconds per named stage of a step: `with timer("generate"): ...`; `on_enter(name)` is
    called as each stage starts (the trainer records progress with it), `on_exit(name)` as it ends, after
    its time is taken (bench step reads peak memory there)."""

    def __init__(self, on_enter=None, on_exit=None):
        self.seconds: dict[str, float] = {}
        self.on_enter = on_enter
        self.on_exit = on_exit

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.on_enter is not None:
            self.on_enter(name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            if self.on_exit is not None:
                self.on_exit(name)


class Tracker:
    """The metric sinks of one run (logging rank; `run_dir=None` elsewhere makes every call a no-op).

    `loggers` names the sinks (`run.loggers`), built in that order. A fresh run starts its files afresh
    (metrics.jsonl; TensorBoard drops older events of the directory). A resumed run (`resume_step=N`)
    keeps the rows of steps ≤ N (a killed run may have logged steps after its last checkpoint, which
    the resumed run logs again), appends after them, and TensorBoard purges its events after step N,
    so no step is counted twice.
    """

    def __init__(self, run_dir: Path | None, *, console_keys: tuple[str, ...] = (), resume_step: int | None = None,
                 loggers: Sequence[str] = DEFAULT_LOGGERS, config: Any = None):
        self.run_dir = run_dir
        self.history: list[dict] = []
        self.sinks: list[MetricSink] = []
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.history = kept_rows(run_dir / "metrics.jsonl", resume_step)
            ctx = SinkContext(run_dir=run_dir, resume_step=resume_step, config=config, console_keys=console_keys)
            try:
                for name in loggers:
                    self.sinks.append(LOGGERS.get(name)(ctx))
            except BaseException:
                self.close()
                raise

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.run_dir is None:
            return
        self.history.append({"step": step, **metrics})
        for sink in self.sinks:
            sink.log(step, metrics)

    def curve(self, key: str, width: int = 50) -> str:
        """A text bar chart of `key` over the logged steps."""
        points = [(r["step"], r[key]) for r in self.history if key in r]
        if not points:
            return f"(no {key} logged)"
        top = max(abs(v) for _, v in points) or 1.0
        return "\n".join(f"{s:5d} {v:8.4f} {'#' * round(width * max(v, 0) / top)}" for s, v in points)

    def close(self) -> None:
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close()

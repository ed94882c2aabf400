"""Per-step metrics of a run: one JSON line per step in `metrics.jsonl`, a readable line on the console,
TensorBoard scalars when tensorboard is installed, and a text curve of one metric at the end.

Only the logging rank (global rank 0) writes; every other rank's tracker does nothing.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path


class Timer:
    """Wall-clock seconds per named stage of a step: `with timer("generate"): ...`; `on_enter(name)` is
    called as each stage starts (the trainer records progress with it)."""

    def __init__(self, on_enter=None):
        self.seconds: dict[str, float] = {}
        self.on_enter = on_enter

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.on_enter is not None:
            self.on_enter(name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def _row(line: str) -> dict | None:
    """A metrics.jsonl line as a dict; None for a blank or cut-off one (a killed run's last line)."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


class Tracker:
    """The metric sinks of one run (logging rank; `run_dir=None` elsewhere makes every call a no-op).

    A fresh run starts `metrics.jsonl` afresh and tells TensorBoard to drop older events of the same
    directory. A resumed run (`resume_step=N`) keeps the rows of steps ≤ N (a killed run may have
    logged steps after its last checkpoint, which the resumed run logs again), appends after them,
    and TensorBoard purges its events after step N, so no step is counted twice.
    """

    def __init__(self, run_dir: Path | None, *, console_keys: tuple[str, ...] = (), resume_step: int | None = None):
        self.run_dir = run_dir
        self.console_keys = console_keys
        self.history: list[dict] = []
        self._file = None
        self._tb = None
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            path = run_dir / "metrics.jsonl"
            if resume_step is not None and path.is_file():
                self.history = [r for r in map(_row, path.read_text().splitlines()) if r and r.get("step", 0) <= resume_step]
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
            os.replace(tmp, path)
            self._file = open(path, "a", buffering=1)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=(resume_step or 0) + 1)
            except Exception:  # noqa: BLE001 - tensorboard is optional
                self._tb = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self._file is None:
            return
        row = {"step": step, **metrics}  # full precision: comparisons of runs (resume, layouts) read these
        self.history.append(row)
        self._file.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        shown = "  ".join(f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}"
                          for k in self.console_keys if k in row)
        print(f"step {step:4d}  {shown}", flush=True)

    def curve(self, key: str, width: int = 50) -> str:
        """A text bar chart of `key` over the logged steps."""
        points = [(r["step"], r[key]) for r in self.history if key in r]
        if not points:
            return f"(no {key} logged)"
        top = max(abs(v) for _, v in points) or 1.0
        return "\n".join(f"{s:5d} {v:8.4f} {'#' * round(width * max(v, 0) / top)}" for s, v in points)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()

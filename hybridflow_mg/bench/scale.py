"""`bench scale`: how reshard time and bytes grow with model depth and world size, and step time with samples.

Each point is a run of an existing benchmark, started as its own command (`hybridflow-mg bench reshard`,
`hybridflow-mg bench step`), whose JSON is kept beside the scale JSON:

- reshard: one `bench reshard` per world size W of `worlds`, measuring every depth of `layers` in that
  run, at the layout train tp=2, pp=W/2 → gen tp=1 (d_g = W: every rank ends with the whole model, so
  the bytes moved grow with W; pp = W/2 must divide every depth). Timed: our serial executor and the
  per-tensor baseline (median of `repeats`, slowest rank).
- step: one `bench step` of CONFIG per value of `prompts_per_step` (samples per step = that × rollout.n),
  each `steps` measured steps after `warmup`; its warm start is `warm_start_steps` (0 by default: a
  random policy answers at full length, so the work per sample stays the same across the sweep).

Each sweep fits log y = a + b·log x by least squares and reports b, the growth exponent (b = 1: linear),
with the points it was fitted on. JSON (`"benchmark": "scale"`):

    benchmark, schema (1), date, command, machine: {cpu, num_cpus, load_avg_1_5_15 (before), ..._after}
    settings: the sweep's arguments
    runs: [{kind: reshard|step, file, status, ...}]: each benchmark run (its exit status; a failed run
          leaves its points out and says so)
    sweeps: [{group, label, x_label, y_label, x: [...], y: [...], fit: {exponent, prefactor, r2} | null}]
        groups: reshard_seconds_vs_layers, reshard_bytes_vs_layers (one series per world size),
        reshard_seconds_vs_world, reshard_bytes_vs_world (one per depth), step_seconds_vs_samples;
        MB = 10^6 bytes received over all ranks per reshard; seconds = per reshard or per step
"""
from __future__ import annotations

import datetime as dt
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

SCHEMA = 1


def fit_exponent(xs: list[float], ys: list[float]) -> dict | None:
    """Least squares of log y = a + b·log x over the points with x, y > 0: {exponent b, prefactor e^a, r2}.
    None with fewer than two distinct x (no slope to fit)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len({p[0] for p in pts}) < 2:
        return None
    n = len(pts)
    mx, my = sum(p[0] for p in pts) / n, sum(p[1] for p in pts) / n
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    b = sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx
    a = my - b * mx
    ss_tot = sum((p[1] - my) ** 2 for p in pts)
    ss_res = sum((p[1] - a - b * p[0]) ** 2 for p in pts)
    return {"exponent": b, "prefactor": math.exp(a), "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0}


@dataclass(kw_only=True)
class ScaleSettings:
    """What `bench scale` sweeps; `bench all --quick` shrinks these."""

    config: str = "configs/quickstart.yaml"
    """The step sweep's config."""
    overrides: list[str] = field(default_factory=list)
    """Dotted overrides of `config` for every step run."""
    worlds: list[int] = field(default_factory=lambda: [2, 4, 8])
    """World sizes of the reshard sweep (even: train tp is 2)."""
    layers: list[int] = field(default_factory=lambda: [8, 16, 32])
    """Model depths of the reshard sweep, each measured at every world size."""
    model_mb: float = 20.0
    """fp32 MB of the first depth's model; deeper ones keep its width (`bench reshard --model-mb`)."""
    bucket_mb: float = 4.0
    """The resharder's bucket size in MB."""
    repeats: int = 5
    """Timed reshard rounds per method (the median is used)."""
    prompts_per_step: list[int] = field(default_factory=lambda: [8, 16, 32])
    """data.prompts_per_step of each step run."""
    nproc: int = 4
    """Ranks of every step run."""
    steps: int = 2
    """Measured steps per step run."""
    warmup: int = 1
    """Unmeasured steps before them."""
    warm_start_steps: int = 0
    """actor.warm_start.steps of each step run."""

    def __post_init__(self):
        for name in ("worlds", "layers", "prompts_per_step"):
            values = getattr(self, name)
            if not values or any(int(v) < 1 for v in values):
                raise ValueError(f"bench scale: {name} must be positive integers, got {values}")
        if any(w % 2 for w in self.worlds):
            raise ValueError(f"bench scale: every world size must be even (train tp=2, pp=W/2), got {self.worlds}")
        for w in self.worlds:
            if any(layers % (w // 2) for layers in self.layers):
                raise ValueError(f"bench scale: pp={w // 2} (world {w}) must divide every depth of layers {self.layers}")
        if min(self.repeats, self.nproc, self.steps) < 1 or self.warmup < 0 or self.warm_start_steps < 0:
            raise ValueError("bench scale: repeats, nproc and steps must be at least 1; warmup and "
                             "warm_start_steps at least 0")


def cli(argv: list[str]) -> int:
    """Run `hybridflow-mg ARGV` as a child process (its output passes through); its exit status."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    print(f"\n[bench] hybridflow-mg {' '.join(argv)}", flush=True)
    return subprocess.run([sys.executable, "-m", "hybridflow_mg.cli", *argv], env=env).returncode


def reshard_layout(world: int) -> tuple[str, str]:
    return f"tp=2,pp={world // 2}", "tp=1"


def run_scale(s: ScaleSettings, out_dir: Path, *, reshard: bool = True, step: bool = True) -> dict:
    """Run the sweeps, each point's JSON into `out_dir`; return the scale report (written by the caller)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    load = [round(x, 2) for x in os.getloadavg()]
    runs, reshard_reports, step_reports = [], {}, {}
    if reshard:
        for world in s.worlds:
            train, gen = reshard_layout(world)
            path = out_dir / f"scale_reshard_w{world}.json"
            path.unlink(missing_ok=True)  # an earlier run's file is not this run's point
            rc = cli(["bench", "reshard", "--nproc", str(world), "--train", train, "--gen", gen,
                      "--layers", ",".join(map(str, s.layers)), "--bucket-mb", f"{s.bucket_mb:g}",
                      "--model-mb", f"{s.model_mb:g}", "--repeats", str(s.repeats), "--out", str(path)])
            runs.append({"kind": "reshard", "world": world, "train": train, "gen": gen, "file": path.name, "status": rc})
            if path.is_file():  # status 1 is a failed check, the timings still stand (the JSON says which)
                reshard_reports[world] = json.loads(path.read_text())
    if step:
        for prompts in s.prompts_per_step:
            path = out_dir / f"scale_step_p{prompts}.json"
            path.unlink(missing_ok=True)
            # no monitoring reference model, as bench all's step (which the points are compared with)
            rc = cli(["bench", "step", s.config, "algo.kl.monitor=false", *s.overrides,
                      f"data.prompts_per_step={prompts}", f"actor.warm_start.steps={s.warm_start_steps}",
                      "--nproc", str(s.nproc), "--steps", str(s.steps), "--warmup", str(s.warmup), "--out", str(path)])
            runs.append({"kind": "step", "prompts_per_step": prompts, "file": path.name, "status": rc})
            if rc == 0 and path.is_file():
                step_reports[prompts] = json.loads(path.read_text())
    return {"benchmark": "scale", "schema": SCHEMA,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["hybridflow-mg", *sys.argv[1:]]),
            "machine": {"cpu": _cpu(), "num_cpus": os.cpu_count(), "load_avg_1_5_15": load,
                        "load_avg_1_5_15_after": [round(x, 2) for x in os.getloadavg()]},
            "settings": asdict(s), "runs": runs,
            "sweeps": reshard_sweeps(reshard_reports) + step_sweeps(step_reports)}


def _sweep(group: str, label: str, x_label: str, y_label: str, xs: list, ys: list) -> dict:
    return {"group": group, "label": label, "x_label": x_label, "y_label": y_label, "x": list(xs), "y": list(ys),
            "fit": fit_exponent(xs, ys)}


def reshard_sweeps(reports: dict[int, dict]) -> list[dict]:
    """From `bench reshard` JSONs by world size: seconds and bytes against depth (per world) and world (per depth).
    Each run of a report is one depth (the scale sweep measures one bucket size)."""
    points = {}  # (world, layers) -> (serial seconds, bytes received over all ranks)
    for world, report in reports.items():
        for run in report["runs"]:
            points[world, run["layers"]] = (run["serial"]["seconds"], sum(run["serial"]["recv_bytes_per_rank"]) / 1e6)
    worlds = sorted({w for w, _ in points})
    depths = sorted({d for _, d in points})
    out = []
    for world in worlds:
        ds = [d for d in depths if (world, d) in points]
        out.append(_sweep("reshard_seconds_vs_layers", f"world {world}", "layers", "seconds per reshard (ours, serial)",
                          ds, [points[world, d][0] for d in ds]))
        out.append(_sweep("reshard_bytes_vs_layers", f"world {world}", "layers", "MB received per reshard (all ranks)",
                          ds, [points[world, d][1] for d in ds]))
    for d in depths:
        ws = [w for w in worlds if (w, d) in points]
        out.append(_sweep("reshard_seconds_vs_world", f"{d} layers", "world size (ranks)",
                          "seconds per reshard (ours, serial)", ws, [points[w, d][0] for w in ws]))
        out.append(_sweep("reshard_bytes_vs_world", f"{d} layers", "world size (ranks)",
                          "MB received per reshard (all ranks)", ws, [points[w, d][1] for w in ws]))
    return out


def step_sweeps(reports: dict[int, dict]) -> list[dict]:
    """From `bench step` JSONs by prompts per step: seconds per step against samples per step."""
    if not reports:
        return []
    rows = sorted((r["settings"]["prompts_per_step"] * r["settings"]["samples_per_prompt"],
                   r["summary"]["seconds"] / r["summary"]["steps"]) for r in reports.values())
    world = next(iter(reports.values()))["layout"]["world"]
    return [_sweep("step_seconds_vs_samples", f"{world} ranks", "samples per step (prompts × n)", "seconds per step",
                   [x for x, _ in rows], [y for _, y in rows])]


def sweep_table(report: dict) -> str:
    """The points and the exponent of each sweep, for the console."""
    lines = [f"bench scale: {len(report['sweeps'])} sweeps (fit log y = a + b·log x; b = growth exponent)"]
    for sw in report["sweeps"]:
        fit = sw["fit"]
        b = f"b = {fit['exponent']:.3f} (R² {fit['r2']:.3f})" if fit else "b = - (fewer than 2 points)"
        pts = ", ".join(f"{x:g}: {y:.4g}" for x, y in zip(sw["x"], sw["y"]))
        lines.append(f"  {sw['group']:26s} {sw['label']:10s} {b:24s} [{sw['x_label']}: {sw['y_label']}] {pts}")
    for run in report["runs"]:
        if run["status"]:
            lines.append(f"  ! {run['kind']} run {run['file']} exited {run['status']}")
    return "\n".join(lines)


def _cpu() -> str:
    from hybridflow_mg.bench.measure import cpu_name

    return cpu_name()

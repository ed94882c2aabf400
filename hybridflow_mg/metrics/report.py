"""Reports of runs as pictures and a table: `hybridflow-mg report RUN_DIR [RUN_DIR ...]`.

Reads each run's `metrics.jsonl` (what the `jsonl` sink wrote) and writes, into one directory:

* `reward.png`: training reward per step (raw, faint, and a trailing mean) and the validation curves
  (`val_reward`, `val/accuracy`);
* `training.png`: the KL terms (`ppo_kl`, `kl`, `rollout_kl`), entropy, response length, truncation rate,
  throughput (`perf/tokens_per_s_per_rank`) and, with a critic, its value loss (`critic/vf_loss`) per step;
* `stage_times.png`: the mean seconds of each stage per step (`time/<stage>`), stacked per run, and the
  seconds of every step;
* `report.md`: the runs, the pictures, the mean stage times and the final metrics (last, mean of the last
  steps, best).

Several runs share each panel (A/B): a run keeps one colour and line style in every picture. A key that a
run did not log is left out for that run and named under "Notes"; a panel no run logged is left out, and so
is a diagnostic one (`ppo_kl`, `kl`, `truncation_rate`) that every run logged as 0 at every step (named under
"Notes"); a reward curve is drawn even when flat at 0.
The directory is written beside its destination and moved into place complete, so a failed report leaves
nothing half-written. matplotlib (Agg, no display) is imported only here, behind one guard.
"""
from __future__ import annotations

import datetime
import math
import re
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from hybridflow_mg.metrics.sinks import kept_rows

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P")
STAGE_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c",
                "#ccb974", "#64b5cd")


@dataclass(frozen=True)
class Panel:
    """One plot of a metric against the step."""

    key: str
    title: str
    ylabel: str
    per_step: bool = True
    """Logged every step: drawn raw (faint) plus a trailing mean; else (validation) as markers."""
    best: str | None = None
    """"max" or "min" when a best value means something (the final table's best column)."""
    omit_if_all_zero: bool = False
    """Left out (and named under Notes) when every run logged it as 0 at every step: for diagnostics
    whose flat zero line says nothing (`ppo_kl` with one on-policy update per batch); never for rewards."""


REWARD_PANELS = (
    Panel("reward_mean", "Training reward (mean over samples)", "reward", best="max"),
    Panel("val_reward", "Validation reward (greedy)", "reward", per_step=False, best="max"),
    Panel("val/accuracy", "Validation accuracy (greedy)", "accuracy (fraction correct)", per_step=False, best="max"),
)
TRAINING_PANELS = (
    Panel("ppo_kl", "KL old → new policy (ppo_kl)", "KL (nats per token)", omit_if_all_zero=True),
    Panel("kl", "KL to the reference, in the loss (kl)", "KL (nats per token)", omit_if_all_zero=True),
    Panel("rollout_kl", "KL to the reference (rollout_kl)", "KL (nats per token)"),
    Panel("entropy", "Policy entropy", "entropy (nats per token)"),
    Panel("response_len", "Response length (mean)", "tokens per response"),
    Panel("truncation_rate", "Truncated responses (hit max_new_tokens or max_model_len)", "fraction of samples",
          omit_if_all_zero=True),
    Panel("perf/tokens_per_s_per_rank", "Throughput (prompt + response tokens)", "tokens/s per rank", best="max"),
    Panel("critic/vf_loss", "Critic value loss (critic/vf_loss)", "value loss (squared error)"),
)
SECONDS = Panel("seconds", "Seconds per step", "seconds", best="min")
TABLE_PANELS = (*REWARD_PANELS, *TRAINING_PANELS, SECONDS)


@dataclass
class Run:
    """One run's logged rows, as read back from its directory."""

    name: str
    directory: Path
    rows: list[dict]
    estimator: str | None = None
    total_steps: int | None = None
    """`trainer.total_steps` of its config: a report of a run still going (or stopped) says how far it got."""
    notes: list[str] = field(default_factory=list)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of `key` in step order, finite numbers only."""
        points = [(r["step"], float(r[key])) for r in self.rows
                  if isinstance(r.get(key), (int, float)) and math.isfinite(float(r[key]))]
        return [s for s, _ in points], [v for _, v in points]

    def has(self, key: str) -> bool:
        return bool(self.series(key)[0])

    def all_zero(self, key: str) -> bool:
        """Logged, and 0 at every step (e.g. `ppo_kl` with one on-policy update per batch)."""
        steps, values = self.series(key)
        return bool(steps) and not any(values)

    def stage_means(self) -> dict[str, float]:
        """Mean seconds per step of each `time/<stage>`: its total over the run / the number of steps, so a
        stage run every k steps (validation) counts 1/k of its time per step."""
        totals: dict[str, float] = {}
        for row in self.rows:
            for k, v in row.items():
                if k.startswith("time/") and isinstance(v, (int, float)) and math.isfinite(v):
                    totals[k[len("time/"):]] = totals.get(k[len("time/"):], 0.0) + float(v)
        return {stage: total / len(self.rows) for stage, total in totals.items()}


def load_runs(directories: Sequence[str | Path]) -> list[Run]:
    """Each directory's metrics, or a one-line ValueError (what, where, how to fix) before anything is written."""
    import yaml

    runs = []
    for d in map(Path, directories):
        path = d / "metrics.jsonl"
        fix = "give a run directory that logged at least one step (run.output_dir/run.name, e.g. runs/quickstart)"
        if not d.is_dir():
            raise ValueError(f"report: {d} is not a directory; {fix}")
        if not path.is_file():
            raise ValueError(f"report: no metrics in {d} ({path} does not exist); {fix}")
        rows = [r for r in kept_rows(path, sys.maxsize) if isinstance(r.get("step"), int)]  # a cut-off last line is dropped
        if not rows:
            raise ValueError(f"report: no metrics in {d} ({path} holds no complete row); {fix}")
        name, estimator, total = d.resolve().name, None, None
        try:
            config = yaml.safe_load((d / "config.yaml").read_text()) or {}
            name = str(config.get("run", {}).get("name") or name)
            estimator = config.get("algo", {}).get("advantage", {}).get("estimator")
            total = config.get("trainer", {}).get("total_steps")
        except (OSError, yaml.YAMLError, AttributeError):  # no or odd config: the folder names the run
            pass
        runs.append(Run(name=name, directory=d, rows=sorted(rows, key=lambda r: r["step"]), estimator=estimator,
                        total_steps=total if isinstance(total, int) else None))
    _disambiguate(runs)
    return runs


def _disambiguate(runs: list[Run]) -> None:
    """Runs of the same name are told apart by their directory as given, or (the same directory twice) by position."""
    names = [r.name for r in runs]
    for i, r in enumerate(runs):
        twins = [runs[j] for j, n in enumerate(names) if n == names[i]]
        if len(twins) > 1:
            distinct = len({str(t.directory) for t in twins}) == len(twins)
            r.name = f"{names[i]} ({r.directory})" if distinct else f"{names[i]} #{i + 1}"


def default_out(runs: Sequence[Run], today: datetime.date | None = None) -> Path:
    """`reports/<date>_<name>_vs_<name>...` (names reduced to file-name characters)."""
    names = "_vs_".join(re.sub(r"[^A-Za-z0-9_.-]+", "-", r.name).strip("-") for r in runs)
    return Path("reports") / f"{(today or datetime.date.today()).isoformat()}_{names[:120]}"


def trailing_median(values: Sequence[float], window: int) -> list[float]:
    """Median of each value and the `window - 1` before it: step times, whose validation steps are spikes."""
    return [statistics.median(values[max(0, i + 1 - window):i + 1]) for i in range(len(values))]


def trailing_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean of each value and the `window - 1` before it (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _pyplot():
    """matplotlib's pyplot on the Agg backend (files only); the one place it is imported."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("report: the report needs matplotlib, which is not installed here: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _style(i: int) -> dict:
    return {"color": COLORS[i % len(COLORS)], "linestyle": LINESTYLES[i % len(LINESTYLES)]}


def _worth_drawing(runs: Sequence[Run], panel: Panel) -> bool:
    """Some run logged the panel's key, and, for a panel `omit_if_all_zero`, not every run that did logged
    only zeros (a flat line at 0 says nothing a note cannot)."""
    logged = [r for r in runs if r.has(panel.key)]
    return bool(logged) and not (panel.omit_if_all_zero and all(r.all_zero(panel.key) for r in logged))


def _curves_figure(plt, runs: Sequence[Run], panels: Sequence[Panel], title: str, window: int, path: Path) -> list[str]:
    """One row (or two) of panels, a line per run; the panels some run logged. Returns the keys drawn."""
    from matplotlib.ticker import MaxNLocator

    drawn = [p for p in panels if _worth_drawing(runs, p)]
    if not drawn:
        return []
    ncols = 2 if len(drawn) == 4 else min(len(drawn), 3)
    nrows = math.ceil(len(drawn) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.0 * ncols, 3.7 * nrows + 0.6), squeeze=False,
                             layout="constrained")
    first, last = min(r.rows[0]["step"] for r in runs), max(r.rows[-1]["step"] for r in runs)
    pad = max(0.5, 0.02 * (last - first))  # every panel spans all steps: a lone validation point stays in place
    for ax, panel in zip(axes.flat, drawn):
        ax.set_xlim(first - pad, last + pad)
        missing = []
        for i, run in enumerate(runs):
            steps, values = run.series(panel.key)
            if not steps:
                missing.append(run.name)
                continue
            style = _style(i)
            if panel.per_step:
                ax.plot(steps, values, color=style["color"], linewidth=0.8, alpha=0.25)
                ax.plot(steps, trailing_mean(values, window), linewidth=1.8, label=run.name, **style)
            else:
                ax.plot(steps, values, marker=MARKERS[i % len(MARKERS)], markersize=5, linewidth=1.6,
                        label=run.name, **style)
        # a run without the key is said in the panel's title (inside the axes it would cover data)
        ax.set_title(panel.title + (f"\n(not logged by: {', '.join(missing)})" if missing else ""), fontsize=11)
        ax.set_xlabel("step")
        ax.set_ylabel(panel.ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(drawn):]:
        ax.set_visible(False)
    handles = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    if window > 1 and any(p.per_step for p in drawn):
        title += f"\nper-step metrics: faint = each step, solid = mean of the last {window} steps"
    fig.suptitle(title, fontsize=11)
    fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncol=min(len(handles), 4), fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [p.key for p in drawn]


def _stage_figure(plt, runs: Sequence[Run], window: int, path: Path) -> bool:
    """Stacked mean seconds per stage (one bar per run) and the seconds of each step."""
    means = [r.stage_means() for r in runs]
    stages = sorted({s for m in means for s in m}, key=lambda s: -max(m.get(s, 0.0) for m in means))
    has_seconds = any(r.has("seconds") for r in runs)
    if not stages and not has_seconds:
        return False
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(13.0, 2.2 + 0.45 * max(len(runs), 4)), layout="constrained",
                             gridspec_kw={"width_ratios": [1.25, 1.0]})
    bars, steps_ax = axes
    if stages:
        y = list(range(len(runs)))[::-1]  # the first run on top
        left = [0.0] * len(runs)
        for j, stage in enumerate(stages):
            widths = [m.get(stage, 0.0) for m in means]
            bars.barh(y, widths, left=left, height=0.5, color=STAGE_COLORS[j % len(STAGE_COLORS)], label=stage,
                      edgecolor="white", linewidth=0.5)
            left = [a + b for a, b in zip(left, widths)]
        for yi, total in zip(y, left):
            bars.text(total, yi, f" {total:.2f} s", va="center", fontsize=9)
        bars.set_yticks(y, [r.name for r in runs])
        bars.set_xlim(0, max(left) * 1.18 or 1.0)
        bars.set_xlabel("mean seconds per step (validation spread over all steps)")
        bars.set_title("Stage times (time/<stage>)", fontsize=11)
        bars.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
                    title="stage", title_fontsize=9, frameon=False)
        bars.grid(True, axis="x", alpha=0.3)
    else:
        bars.set_visible(False)
    if has_seconds:
        for i, run in enumerate(runs):
            steps, values = run.series("seconds")
            if steps:
                style = _style(i)
                steps_ax.plot(steps, values, color=style["color"], linewidth=0.8, alpha=0.3)
                steps_ax.plot(steps, trailing_median(values, window), linewidth=1.8, label=run.name, **style)
        steps_ax.set_ylim(bottom=0)
        steps_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        steps_ax.set_xlabel("step")
        steps_ax.set_ylabel("seconds")
        steps_ax.set_title(f"Seconds per step\nfaint: each step; solid: median of the last {window}", fontsize=11)
        steps_ax.grid(True, alpha=0.3)
        steps_ax.legend(fontsize=9, loc="best")
    else:
        steps_ax.set_visible(False)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.4g}"


def final_table(runs: Sequence[Run], last_n: int = 5) -> list[str]:
    """Markdown rows: per metric and run, the last value, the mean of the last `last_n` logged values (per-step
    metrics) and the best with its step (rewards, accuracy; the fastest step)."""
    head = ["metric"]
    for r in runs:
        head += [f"{r.name}: last", f"{r.name}: last {last_n} mean", f"{r.name}: best (step)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for panel in TABLE_PANELS:
        if not any(r.has(panel.key) for r in runs):
            continue
        cells = [f"`{panel.key}`"]
        for r in runs:
            steps, values = r.series(panel.key)
            if not steps:
                cells += ["not logged", "", ""]
                continue
            tail = values[-last_n:]
            best = ""
            if panel.best:
                pick = max if panel.best == "max" else min
                i = values.index(pick(values))
                best = f"{_fmt(values[i])} ({steps[i]})"
            cells += [f"{_fmt(values[-1])} ({steps[-1]})", _fmt(sum(tail) / len(tail)) if panel.per_step else "", best]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _notes(runs: Sequence[Run], drawn: set[str]) -> list[str]:
    notes = []
    for panel in TABLE_PANELS:
        if panel.key not in drawn and panel.key != "seconds" and not any(r.has(panel.key) for r in runs):
            notes.append(f"`{panel.key}` was logged by no run; its panel is left out.")
        elif panel.key not in drawn and panel.key != "seconds" and not _worth_drawing(runs, panel):
            notes.append(f"`{panel.key}` is 0 at every step of every run that logged it; its panel is left out.")
        elif panel.key in drawn:
            missing = [r.name for r in runs if not r.has(panel.key)]
            if missing:
                notes.append(f"`{panel.key}` was not logged by {', '.join(missing)}: skipped for "
                             f"{'that run' if len(missing) == 1 else 'those runs'}.")
    return notes


def write_report(runs: Sequence[Run], out: Path, *, window: int = 10) -> list[Path]:
    """Write the pictures and report.md into `out` (built in `out.partial`, then moved into place). An existing
    `out` is replaced only when it is itself a report (holds report.md). Returns the files written."""
    from hybridflow_mg.checkpoint.training import replace_dir

    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "report.md").is_file())):
        raise ValueError(f"report: --out {out} exists and is not a report (no report.md in it); "
                         "give a new directory, or that of an earlier report to replace it")
    plt = _pyplot()
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        drawn = set(_curves_figure(plt, runs, REWARD_PANELS, "Reward and validation", window,
                                   tmp / "reward.png"))
        drawn |= set(_curves_figure(plt, runs, TRAINING_PANELS, "KL, entropy, length, truncation, throughput", window,
                                    tmp / "training.png"))
        has_stages = _stage_figure(plt, runs, window, tmp / "stage_times.png")
        (tmp / "report.md").write_text(_markdown(runs, drawn, has_stages))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)
    return sorted(out.iterdir())


def _markdown(runs: Sequence[Run], drawn: set[str], has_stages: bool) -> str:
    md = [f"# Report: {' vs '.join(r.name for r in runs)}", "",
          f"Written by `hybridflow-mg report` on {datetime.date.today().isoformat()}.", "",
          "| run | directory | advantage estimator | steps logged | last step / planned |", "|---|---|---|---|---|"]
    for r in runs:
        last = r.rows[-1]["step"]
        planned = "—" if r.total_steps is None else f"{r.total_steps}" + (" (not reached)" if last < r.total_steps else "")
        md.append(f"| {r.name} | `{r.directory}` | {r.estimator or '—'} | {len(r.rows)} | {last} / {planned} |")
    if drawn & {p.key for p in REWARD_PANELS}:
        md += ["", "## Reward and validation", "", "![reward and validation](reward.png)"]
    if drawn & {p.key for p in TRAINING_PANELS}:
        md += ["", "## KL, entropy, length, truncation, throughput", "", "![KL, entropy, length, truncation, throughput](training.png)"]
    if has_stages:
        md += ["", "## Stage times", "", "![stage times](stage_times.png)", ""]
        means = [r.stage_means() for r in runs]
        stages = sorted({s for m in means for s in m}, key=lambda s: -max(m.get(s, 0.0) for m in means))
        if stages:
            md += ["Mean seconds per step (a stage's total over the run / the steps logged):", "",
                   "| stage | " + " | ".join(r.name for r in runs) + " |", "|" + "---|" * (len(runs) + 1)]
            md += [f"| {s} | " + " | ".join(_fmt(m.get(s)) for m in means) + " |" for s in stages]
            md.append("| **total** | " + " | ".join(_fmt(sum(m.values())) for m in means) + " |")
    md += ["", "## Final metrics", "", "Value (step); the mean of the last 5 logged values for per-step metrics; "
           "the best value and its step for rewards, accuracy, throughput and step time.", "", *final_table(runs)]
    notes = _notes(runs, drawn)
    if notes:
        md += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    return "\n".join(md) + "\n"

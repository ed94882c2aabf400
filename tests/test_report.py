"""`hybridflow-mg report` (metrics/report.py): two synthetic runs give valid PNGs and a report.md whose final
table holds the logged numbers; a key one run lacks is skipped for it and noted; a cut-off last line is
dropped; a directory without metrics is one line, status 2, and nothing written. One process, no model."""
from __future__ import annotations

import json

from hybridflow_mg.metrics.report import load_runs, trailing_mean
from tests.clirun import cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(path, name, estimator, rows, cut_tail=False):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(f"run:\n  name: {name}\nalgo:\n  advantage:\n    estimator: {estimator}\n"
                                      "trainer:\n  total_steps: 20\n")
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if cut_tail:  # a killed run: half a row at the end
        text += '{"step": 99, "reward_m'
    (path / "metrics.jsonl").write_text(text)
    return path


def _cells(line):
    """The cells of a markdown table row, stripped; [] for any other line."""
    return [c.strip() for c in line.strip()[1:-1].split("|")] if line.startswith("|") else []


def _rows(num_steps, reward, *, accuracy=True, value_loss=False):
    rows = []
    for step in range(1, num_steps + 1):
        row = {"step": step, "reward_mean": reward(step), "entropy": 1.0 / step, "ppo_kl": 0.01 * step,
               "response_len": 3.0 + step, "seconds": 1.0 + 0.1 * step, "time/generate": 0.25, "time/actor_update": 0.5}
        if step % 5 == 0:
            row["val_reward"] = step / 100
            row["time/validate"] = 2.0
            if accuracy:
                row["val/accuracy"] = step / 50
        if value_loss:  # PPO with a critic
            row["time/values"] = 0.125
            row["critic/vf_loss"] = 2.0 / step
        rows.append(row)
    return rows


def test_two_runs_write_valid_pngs_and_the_final_table(tmp_path):
    a = _run(tmp_path / "a", "grpo_run", "grpo", _rows(20, lambda s: s / 40, accuracy=False), cut_tail=True)
    b = _run(tmp_path / "b", "ppo_run", "gae", _rows(15, lambda s: 0.9 if s == 7 else 0.5, value_loss=True))
    out = tmp_path / "report"
    done = cli("report", a, b, "--out", out)
    assert done.returncode == 0, done.stderr
    assert f"in {out}" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "reward.png", "stage_times.png", "training.png"]
    for png in ("reward.png", "training.png", "stage_times.png"):
        data = (out / png).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 20_000, png
    md = (out / "report.md").read_text()
    for picture in ("(reward.png)", "(training.png)", "(stage_times.png)"):
        assert picture in md
    assert "| grpo_run | " in md and "| gae |" in md
    assert "| 20 / 20 |" in md and "| 15 / 20 (not reached) |" in md  # the PPO run stopped early
    rows = {c[0].strip("`"): c[1:] for c in map(_cells, md.splitlines()) if c and c[0].startswith("`")}
    # per run: last (step), mean of the last 5, best (step)
    assert rows["reward_mean"][:3] == ["0.5 (20)", f"{sum(s / 40 for s in range(16, 21)) / 5:.4g}", "0.5 (20)"]
    assert rows["reward_mean"][3:6] == ["0.5 (15)", "0.5", "0.9 (7)"]
    assert rows["val_reward"][0] == "0.2 (20)" and rows["val_reward"][3] == "0.15 (15)"
    assert rows["val/accuracy"][:3] == ["not logged", "", ""] and rows["val/accuracy"][3] == "0.3 (15)"
    assert rows["ppo_kl"][0] == "0.2 (20)" and rows["entropy"][3] == "0.06667 (15)"
    assert rows["seconds"][2] == "1.1 (1)"
    assert rows["critic/vf_loss"][:3] == ["not logged", "", ""] and rows["critic/vf_loss"][3:5] == ["0.1333 (15)", "0.1557"]
    assert "kl" not in rows and "rollout_kl" not in rows  # logged by no run: no row, no panel
    assert "`val/accuracy` was not logged by grpo_run: skipped for that run." in md
    assert "`kl` was logged by no run" in md
    # mean seconds per step: validation every 5th step spreads 2 s over 5 steps; values only in the PPO run
    stages = {c[0]: c[1:] for c in map(_cells, md.splitlines()) if c}
    assert stages["validate"] == ["0.4", "0.4"] and stages["values"] == ["—", "0.125"]
    assert stages["**total**"] == ["1.15", "1.275"]


def test_runs_of_one_name_are_told_apart_and_the_cut_off_line_is_dropped(tmp_path):
    a = _run(tmp_path / "x" / "run", "same", "grpo", _rows(3, lambda s: 0.1), cut_tail=True)
    b = _run(tmp_path / "y" / "run", "same", "grpo", _rows(3, lambda s: 0.2))
    runs = load_runs([a, b])
    assert [r.name for r in runs] == [f"same ({a})", f"same ({b})"]
    assert [r.rows[-1]["step"] for r in runs] == [3, 3]
    assert [r.name for r in load_runs([a, a])] == ["same #1", "same #2"]
    assert trailing_mean([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]


def test_a_directory_without_metrics_is_one_line_and_writes_nothing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    done = cli("report", empty, "--out", out)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert f"no metrics in {empty} ({empty / 'metrics.jsonl'} does not exist); give a run directory" in done.stderr
    (empty / "metrics.jsonl").write_text('{"step": 1, "rew')  # only a cut-off line
    done = cli("report", empty, "--out", out)
    assert done.returncode == 2 and "holds no complete row" in done.stderr
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    # an --out that is some other directory is never replaced
    good = _run(tmp_path / "good", "g", "grpo", _rows(3, lambda s: 0.1))
    done = cli("report", good, "--out", good)
    assert done.returncode == 2 and "exists and is not a report" in done.stderr
    assert sorted(p.name for p in good.iterdir()) == ["config.yaml", "metrics.jsonl"]


def test_a_panel_of_zeros_only_is_left_out_and_said(tmp_path):
    from hybridflow_mg.metrics import report

    zeros, some = _rows(4, lambda s: 0.1), _rows(4, lambda s: 0.2)
    for row in zeros + some:
        row["truncation_rate"] = 0.0
    a = _run(tmp_path / "a", "a", "grpo", zeros)
    b = _run(tmp_path / "b", "b", "grpo", some)
    plt = report._pyplot()
    drawn = report._curves_figure(plt, load_runs([a, b]), report.TRAINING_PANELS, "t", 1, tmp_path / "t.png")
    assert "truncation_rate" not in drawn and "entropy" in drawn
    assert "`truncation_rate` is 0 at every step of every run that logged it; its panel is left out." in \
        report._notes(load_runs([a, b]), set(drawn))
    for row in zeros + some:  # a run that never learns: its flat reward curve is the point
        row["reward_mean"] = 0.0
    a0, b0 = _run(tmp_path / "a0", "a", "grpo", zeros), _run(tmp_path / "b0", "b", "grpo", some)
    assert "reward_mean" in report._curves_figure(plt, load_runs([a0, b0]), report.REWARD_PANELS, "r", 1,
                                                  tmp_path / "r.png")
    some[2]["truncation_rate"] = 0.25  # one run's one step: worth a panel
    b = _run(tmp_path / "b2", "b", "grpo", some)
    assert "truncation_rate" in report._curves_figure(plt, load_runs([a, b]), report.TRAINING_PANELS, "t", 1,
                                                      tmp_path / "t2.png")

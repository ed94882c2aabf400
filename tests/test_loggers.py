"""Metric sinks (`run.loggers`, metrics/sinks.py): the default ones write what they always wrote, a team's
own sink registered from a file receives every step, bad names and a missing wandb are one line before
anything starts, and wandb in offline mode writes the run under the run directory. One process, no
model: each test builds a `Tracker` as the trainer's setup does."""
from __future__ import annotations

import io
import json
import sys

import pytest

from hybridflow_mg.config.load import load_config
from hybridflow_mg.metrics.tracker import Tracker
from hybridflow_mg.trainer.config import TrainConfig
from tests.clirun import cli

QUICKSTART = "configs/quickstart.yaml"
STEPS = [{"reward_mean": 0.25, "kl": 0.001953125, "seconds": 3}, {"reward_mean": 0.123456789, "kl": 0.5, "seconds": 4}]


def _config(tmp_path, *overrides):
    return load_config(TrainConfig, QUICKSTART, [f"run.output_dir={tmp_path}", *overrides])


def _log_steps(tracker: Tracker) -> None:
    for step, metrics in enumerate(STEPS, start=1):
        tracker.log(step, dict(metrics))
    tracker.close()


def test_the_default_loggers_write_the_same_rows_and_lines_as_before(tmp_path, capsys):
    cfg = _config(tmp_path)
    assert cfg.run.loggers == ["jsonl", "console", "tensorboard"]
    run_dir = tmp_path / "run"
    _log_steps(Tracker(run_dir, loggers=cfg.run.loggers, config=cfg, console_keys=("reward_mean", "kl", "seconds")))
    # What the tracker wrote before the sinks existed: one json.dumps row per step, full precision.
    assert (run_dir / "metrics.jsonl").read_text() == (
        '{"step": 1, "reward_mean": 0.25, "kl": 0.001953125, "seconds": 3}\n'
        '{"step": 2, "reward_mean": 0.123456789, "kl": 0.5, "seconds": 4}\n')
    assert capsys.readouterr().out == ("step    1  reward_mean=0.25  kl=0.001953  seconds=3\n"
                                       "step    2  reward_mean=0.1235  kl=0.5  seconds=4\n")
    assert any((run_dir / "tensorboard").iterdir())
    # A resume from step 1 keeps row 1 (history too) and logs step 2 again after it.
    again = Tracker(run_dir, resume_step=1, loggers=["jsonl"], config=cfg)
    assert again.history == [{"step": 1, **STEPS[0]}]
    again.log(2, {"reward_mean": 1.0})
    again.close()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, **STEPS[0]}, {"step": 2, "reward_mean": 1.0}]


def test_a_sink_registered_by_a_file_in_run_imports_receives_every_step(tmp_path):
    plugin = tmp_path / "my_sink.py"
    plugin.write_text(
        "from hybridflow_mg.metrics.sinks import LOGGERS, MetricSink\n"
        "\n"
        "@LOGGERS.register('test_memory')\n"
        "class MemorySink(MetricSink):\n"
        "    def __init__(self, ctx):\n"
        "        self.run_name, self.rows, self.closed = ctx.config.run.name, [], False\n"
        "    def log(self, step, metrics):\n"
        "        self.rows.append((step, dict(metrics)))\n"
        "    def close(self):\n"
        "        self.closed = True\n")
    cfg = _config(tmp_path, f"run.imports=[{plugin}]", "run.loggers=[jsonl,test_memory]")
    tracker = Tracker(tmp_path / "run", loggers=cfg.run.loggers, config=cfg)
    sink = tracker.sinks[1]
    _log_steps(tracker)
    assert sink.run_name == cfg.run.name and sink.closed
    assert sink.rows == [(1, STEPS[0]), (2, STEPS[1])]
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2  # the others still write


@pytest.mark.parametrize("loggers, says", [
    ("[jsonl,jsnol]", "run: loggers[1]: unknown logger 'jsnol' (did you mean 'jsonl'?); valid names: console, jsonl"),
    ("[jsonl,jsonl]", "run: loggers names 'jsonl' twice"),
])
def test_a_bad_logger_name_is_one_line_before_the_launch(tmp_path, loggers, says):
    proc = cli("train", QUICKSTART, "--nproc", "4", f"run.output_dir={tmp_path}", f"run.loggers={loggers}")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"hybridflow-mg: error: {says}"), proc.stderr
    assert not any(tmp_path.iterdir())  # nothing was started or written


def test_wandb_asked_for_but_not_installed_is_one_line_before_the_launch(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an environment without wandb sees
    proc = cli("train", QUICKSTART, "--nproc", "4", f"run.output_dir={tmp_path}", "run.loggers=[jsonl,wandb]")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("hybridflow-mg: error: run: loggers[1]: the wandb logger needs the wandb package, "
                                  "which is not installed here: pip install wandb"), proc.stderr


def test_wandb_offline_writes_the_run_and_its_config_under_the_run_directory(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb; launch/test.sh installs it)")
    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_API_KEY", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)  # the default must be offline, whatever this machine sets
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "home" / var.lower()))  # keep the user's ~ untouched
    cfg = _config(tmp_path, "run.name=wb_run", "run.loggers=[jsonl,wandb]", "run.wandb.tags=[smoke]")
    run_dir = tmp_path / "wb_run"
    _log_steps(Tracker(run_dir, loggers=cfg.run.loggers, config=cfg))
    # finish() hands the last records to wandb's service process, which writes them out by its teardown
    # (at exit in a training process; a busy machine showed the file still empty right after finish).
    wandb.teardown()
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, sorted(p.name for p in (run_dir / "wandb").iterdir())
    (records,) = runs[0].glob("run-*.wandb")  # what `wandb sync` uploads: every record of the run
    data = records.read_bytes()
    # History values are stored as JSON text next to their keys: every logged value is there.
    for metrics in STEPS:
        for key, value in metrics.items():
            assert key.encode() in data and json.dumps(value).encode() in data, (key, value)
    assert b"wb_run" in data and b"smoke" in data  # the run name (and group), the tags
    assert b"micro_batch_tokens" in data  # the resolved config was logged
    assert (run_dir / "metrics.jsonl").is_file()


def test_progress_bars_draw_on_a_terminal_only(monkeypatch):
    from hybridflow_mg.metrics.progress_bar import progress_bar, write

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, enabled, drawn in ((Terminal(), True, True), (io.StringIO(), True, False), (Terminal(), False, False)):
        monkeypatch.setattr(sys, "stderr", stream)
        assert list(progress_bar(range(3), desc="warm start", enabled=enabled)) == [0, 1, 2]
        assert ("warm start" in stream.getvalue()) == drawn
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    write("warm start    0/5: cross-entropy 2.0000")
    assert out.getvalue() == "warm start    0/5: cross-entropy 2.0000\n"  # what print wrote

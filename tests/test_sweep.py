"""`hybridflow-mg sweep`: the consistency and mean ± std by hand, the bad inputs in one line, and the whole
command through the CLI with its child processes replaced by a stand-in that writes what `train` and
`eval` write (a real 2-seed sweep of the shortened quickstart takes minutes: see the README's smoke run)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from hybridflow_mg.evaluation import sweep
from tests.clirun import cli

# 3 runs × 4 prompts
ANSWERS = [["5", "7", None, "3"],
           ["5", "8", None, "3"],
           ["5", "7", "2", "4"]]
REWARDS = [[1.0, 1.0, 0.0, 1.0],
           [1.0, 0.0, 0.0, 1.0],
           [1.0, 1.0, 1.0, 0.0]]


def test_consistency_by_hand():
    c = sweep.consistency(ANSWERS, REWARDS)
    # all equal: prompt 0 only (prompt 2's missing answers agree with nothing) → 1/4
    assert c["agreement"] == 0.25
    # equal pairs of the 3 pairs (01, 02, 12): p0 3/3, p1 1/3 (runs 0, 2), p2 0/3, p3 1/3 (runs 0, 1) → (5/3)/4
    assert math.isclose(c["pairwise_agreement"], 5 / 12)
    # sample std over runs: p0 {1,1,1} 0; p1 {1,0,1}, p2 {0,0,1}, p3 {1,1,0}: mean 2/3 or 1/3,
    # Σ(v−m)² = 2/3, / (3 − 1) → √(1/3) each
    assert math.isclose(c["reward_std"], 3 * math.sqrt(1 / 3) / 4)
    assert (c["num_runs"], c["num_prompts"]) == (3, 4)


def test_two_runs_agreement_is_pairwise():
    c = sweep.consistency(ANSWERS[:2], REWARDS[:2])
    # p0 and p3 equal, p1 differs, p2 missing → 2/4; reward std: p1 {1, 0} → √(1/2), others 0
    assert c["agreement"] == c["pairwise_agreement"] == 0.5
    assert math.isclose(c["reward_std"], math.sqrt(0.5) / 4)


def test_consistency_needs_two_runs_and_the_same_prompts():
    with pytest.raises(ValueError, match="at least 2 runs"):
        sweep.consistency(ANSWERS[:1], REWARDS[:1])
    with pytest.raises(ValueError, match="same prompts"):
        sweep.consistency([["1"], ["1", "2"]], [[1.0], [1.0, 0.0]])


def test_mean_std_and_aligned():
    table = sweep.mean_std([{"val_reward": 0.5, "only_0": 1.0}, {"val_reward": 0.7}, {"val_reward": 0.9}])
    assert list(table) == ["val_reward"]  # a key one run lacks is left out
    assert math.isclose(table["val_reward"]["mean"], 0.7)
    assert math.isclose(table["val_reward"]["std"], 0.2)  # √((0.04 + 0 + 0.04) / 2)
    assert table["val_reward"]["values"] == [0.5, 0.7, 0.9]

    def rec(p, answer, reward, prompt="q"):
        return {"prompt_index": p, "prompt": f"{prompt}{p}", "ground_truth": str(p), "answer": answer, "reward": reward}

    answers, rewards = sweep.aligned([[rec(1, "b", 0), rec(0, "a", 1)], [rec(0, "a", 1), rec(1, "c", 1)]])
    assert answers == [["a", "b"], ["a", "c"]] and rewards == [[1.0, 0.0], [1.0, 1.0]]
    with pytest.raises(ValueError, match="different prompts"):
        sweep.aligned([[rec(0, "a", 1)], [rec(0, "a", 1, prompt="other")]])


def test_final_val_metrics(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 1, "val_reward": 0.25, "val/accuracy": 0.25, "reward_mean": 0.1}\n'
                 '{"step": 2, "reward_mean": 0.2}\n'
                 '{"step": 3, "val_reward": 0.5, "val/accuracy": 0.5}\n'
                 '{"step": 4, "val_')  # cut off
    assert sweep.final_val_metrics(f) == (3, {"val_reward": 0.5, "val/accuracy": 0.5})


@pytest.mark.parametrize("args, line", [
    (["--seeds", "1"], "--seeds must be at least 2, got 1"),
    (["--seeds", "0"], "--seeds must be at least 2, got 0"),
    (["--seeds", "2", "--parallel", "0"], "--parallel must be at least 1"),
    (["--seeds", "2", "run.seeed=3"], "unknown config key"),
    (["--seeds", "2", "--data", "nowhere.parquet"], "--data 'nowhere.parquet' does not exist"),
    (["--seeds", "2", "trainer.save_final=false"], "trainer.save_final=false leaves no final checkpoint"),
    (["--seeds", "2", "run.loggers=[console]"], "has no jsonl: the sweep reads each run's metrics.jsonl"),
])
def test_bad_input_is_one_line(tmp_path, args, line):
    proc = cli("sweep", "configs/quickstart.yaml", f"run.output_dir={tmp_path}", *args)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and line in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []


def _option(argv: list[str], key: str) -> str:
    return next(a.split("=", 1)[1] for a in argv if a.startswith(key + "="))


def _stand_in(fail_seed: int | None = None):
    """A runner that writes what `train` (metrics.jsonl, checkpoints/final) and `eval` (the JSON and its
    samples) write. Seed s answers prompt p with str(p + (p == 3) * s): prompts 0-2 agree, 3 does not."""
    calls = []

    def runner(argv, log, env):
        calls.append(argv)
        log.write_text("training...\n")
        if argv[0] == "train":
            seed = int(_option(argv, "run.seed")) - 7  # the quickstart's run.seed is 7
            if seed == fail_seed:
                log.write_text("hybridflow-mg: error: rank 1: RuntimeError: boom\n")
                return 1
            run = Path(_option(argv, "run.output_dir")) / _option(argv, "run.name")
            (run / "checkpoints" / "final").mkdir(parents=True)
            (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "val_reward": 0.5 + seed / 10}) + "\n")
            return 0
        seed = int(Path(argv[1]).parent.parent.name.rsplit("seed", 1)[1])
        out = Path(argv[argv.index("--out") + 1])
        records = [{"prompt_index": p, "sample_index": 0, "prompt": f"{p}+0=", "ground_truth": str(p),
                    "answer": str(p + (p == 3) * seed), "reward": float(p != 3 or seed == 0)} for p in range(4)]
        Path(str(out) + ".samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        acc = sum(r["reward"] for r in records) / 4
        out.write_text(json.dumps({"model_step": 1, "metrics": {"accuracy": acc, "pass@1": acc, "num_prompts": 4}}))
        return 0

    return runner, calls


def test_sweep_through_the_cli(tmp_path, monkeypatch):
    runner, calls = _stand_in()
    threads = []

    def recording(argv, log, env):
        threads.append(env.get("OMP_NUM_THREADS"))
        return runner(argv, log, env)

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(sweep, "run_cli", recording)
    proc = cli("sweep", "configs/quickstart.yaml", "--seeds", "3", f"run.output_dir={tmp_path}",
               "trainer.total_steps=1")
    assert proc.returncode == 0, proc.stderr
    trains = [c for c in calls if c[0] == "train"]
    assert [_option(c, "run.name") for c in trains] == ["quickstart_seed0", "quickstart_seed1", "quickstart_seed2"]
    assert [_option(c, "run.seed") for c in trains] == ["7", "8", "9"]
    assert [_option(c, "rollout.seed") for c in trains] == ["7", "8", "9"]
    assert all(_option(c, "model.synthetic.seed") == "7" and c[-2:] == ["--nproc", "2"] for c in trains)
    evals = [c for c in calls if c[0] == "eval"]
    assert evals[1][1] == str(tmp_path / "quickstart_seed1" / "checkpoints" / "final")
    assert evals[1][evals[1].index("--data") + 1] == str(tmp_path / "quickstart_seed1" / "data" / "val.parquet")
    options = dict(zip(evals[0][2::2], evals[0][3::2]))
    assert {"--temperature": "0", "--n": "1", "--max-tokens": "6"}.items() <= options.items()

    out = tmp_path / "quickstart_sweep"
    summary = json.loads((out / "sweep.json").read_text())
    assert math.isclose(summary["metrics"]["val_reward"]["mean"], 0.6)
    assert math.isclose(summary["metrics"]["val_reward"]["std"], 0.1)
    assert math.isclose(summary["metrics"]["eval/accuracy"]["mean"], (1 + 0.75 + 0.75) / 3)
    assert set(summary["metrics"]) == {"val_reward", "eval/accuracy"}  # counts and pass@1 are left out
    c = summary["consistency"]
    assert c["agreement"] == 0.75 and c["pairwise_agreement"] == 0.75  # prompt 3: three different answers
    assert math.isclose(c["reward_std"], math.sqrt(1 / 3) / 4)  # prompt 3's rewards {1, 0, 0}
    md = (out / "sweep.md").read_text()
    assert "| `val_reward` | 0.6 ± 0.1 | 0.5 | 0.6 | 0.7 |" in md and "| 0.750 | 0.750 | 0.144 |" in md
    assert "answers agree on 0.750 of 4 prompts" in proc.stdout
    assert threads == ["1"] * 6  # on CPU one compute thread per rank, as launch/quickstart.sh runs it


def test_a_failed_seed_is_named(tmp_path, monkeypatch):
    runner, calls = _stand_in(fail_seed=1)
    monkeypatch.setattr(sweep, "run_cli", runner)
    proc = cli("sweep", "configs/quickstart.yaml", "--seeds", "3", f"run.output_dir={tmp_path}")
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "seed 1 (run.seed=8" in proc.stderr and "failed in train with status 1: " in proc.stderr
    assert "rank 1: RuntimeError: boom" in proc.stderr and "seed1.train.log" in proc.stderr
    assert f"seed 0: {tmp_path / 'quickstart_seed0'}" in proc.stderr and "no sweep.json" in proc.stderr
    assert len([c for c in calls if c[0] == "train"]) == 2  # seed 2 never started
    assert not (tmp_path / "quickstart_sweep" / "sweep.json").exists()


def test_a_sigterm_during_a_seed_stops_the_sweep_resumable(tmp_path, monkeypatch):
    """Through the CLI: the SIGTERM arrives while seed 1 trains (its job then saves and exits 75)."""
    import os
    import signal

    runner, calls = _stand_in()

    def terminated_in_seed_1(argv, log, env):
        if argv[0] == "train" and _option(argv, "run.seed") == "8":
            os.kill(os.getpid(), signal.SIGTERM)  # to the sweep: its handler forwards it
            return 75
        return runner(argv, log, env)

    monkeypatch.setattr(sweep, "run_cli", terminated_in_seed_1)
    monkeypatch.setattr(sweep, "CHILDREN", sweep.Children())
    before = signal.getsignal(signal.SIGTERM)
    try:
        proc = cli("sweep", "configs/quickstart.yaml", "--seeds", "3", f"run.output_dir={tmp_path}")
    finally:
        signal.signal(signal.SIGTERM, before)
    assert proc.returncode == 75, proc.stderr
    assert "stopped by SIGTERM" in proc.stderr and "the same command resumes" in proc.stderr
    assert [_option(c, "run.seed") for c in calls if c[0] == "train"] == ["7"]  # seed 2 never started
    assert not (tmp_path / "quickstart_sweep" / "sweep.json").exists()


def test_a_sigterm_to_the_sweep_reaches_its_running_child(tmp_path):
    """The child stands in for a training job: it ends on SIGTERM with 75, as a preempted run does."""
    import signal
    import sys
    import threading
    import time

    children = sweep.Children()
    ready = tmp_path / "ready"
    child = ("import pathlib, signal, sys, time\n"
             "signal.signal(signal.SIGTERM, lambda *a: sys.exit(75))\n"
             f"pathlib.Path({str(ready)!r}).touch()\n"
             "time.sleep(120)\n")
    codes = []
    lane = threading.Thread(target=lambda: codes.append(children.run([sys.executable, "-c", child], tmp_path / "log",
                                                                     env={})))
    lane.start()
    end = time.monotonic() + 60
    while not ready.exists():
        assert time.monotonic() < end
        time.sleep(0.05)
    children.forward(signal.SIGTERM)
    lane.join(timeout=30)
    assert codes == [75] and not lane.is_alive()
    with pytest.raises(sweep.SweepStopped, match="stopped by SIGTERM"):  # no further child starts
        children.run([sys.executable, "-c", "open('started', 'w')"], tmp_path / "log2", env={})
    assert not (tmp_path / "log2").exists()

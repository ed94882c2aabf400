"""The `hybridflow-mg` command line: planning output, and one-line errors with a non-zero exit."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "hybridflow_mg.cli", *args], cwd=ROOT, capture_output=True, text=True)


def test_grid_json_has_one_entry_per_rank():
    proc = cli("grid", "--world", "8", "--train", "tp=2,pp=2", "--gen", "tp=1", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert len(plan["ranks"]) == 8
    row = plan["ranks"][5]
    assert row["rank"] == 5 and row["train"] == {"tp": 1, "pp": 1, "dp": 0}
    assert set(row["gen"]) == {"tp", "pp", "replica", "weight_tp"}
    assert row["micro_dp_group"] == [0, 1, 4, 5]
    assert row["recv_fraction"] == pytest.approx(3 / 4)  # (d_g − 1)/(t·p) = 3/4


@pytest.mark.parametrize("world,train,gen,fraction", [
    ("4", "tp=2,pp=2", "tp=4", "1/8"),  # t_g > t: the gen slice inside the rank's own TP slice, its stage's layers held
    ("64", "tp=4,pp=4", "tp=8", "3/32"),  # NeMo-RL's 70B GRPO layout: (p − 1)/(t_g·p)
])
def test_grid_gen_tp_above_train_tp_gives_every_rank_the_minimum(world, train, gen, fraction):
    proc = cli("grid", "--world", world, "--train", train, "--gen", gen, "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert {row["recv_fraction_exact"] for row in plan["ranks"]} == {fraction} == {plan["min_recv_fraction_exact"]}


def test_grid_table_is_readable():
    proc = cli("grid", "--world", "8", "--train", "tp=4,pp=1", "--gen", "tp=2")
    assert proc.returncode == 0
    assert "d_g=2" in proc.stdout and "(d_g−1)/(t·p) = 1/4" in proc.stdout


def test_config_command_prints_resolved_yaml():
    proc = cli("config", "configs/quickstart.yaml", "parallel.train.tp=2", "--world", "4")
    assert proc.returncode == 0, proc.stderr
    assert "tp: 2" in proc.stdout


@pytest.mark.parametrize("args,message", [
    (("grid", "--world", "8", "--train", "tp=3,pp=1"), "does not divide the world of 8"),
    (("grid", "--world", "8", "--train", "tp=2,pp=2,dp=4"), "make tp·pp·dp equal 8"),
    (("grid", "--world", "8", "--train", "tp=2,pp=2", "--gen", "tp=3"), "does not divide the training tp·pp"),
    (("grid", "--world", "8", "--train", "tp=0,pp=2"), "must be a positive integer"),
    (("grid", "--world", "8", "--train", "tp=2,pp=1,vpp=2"), "needs pp > 1"),
    (("grid", "--world", "8", "--train", "tp=2,ppp=1"), "unknown size 'ppp' (did you mean 'pp'?)"),
    (("config", "configs/quickstart.yaml", "parallel.train.tpp=2"), "did you mean 'parallel.train.tp'?"),
    (("config", "configs/quickstart.yaml", "parallel.train.tp=3", "--world", "8"), "does not divide the world of 8"),
    (("config", "configs/quickstart.yaml", "algo.advantage.estimator=grpoo"), "valid names"),
    (("config", "configs/quickstart.yaml", "algo.policy_loss.name=ppo"), "valid names"),
    (("config", "configs/missing.yaml"), "does not exist"),
])
def test_bad_input_exits_non_zero_with_one_line(args, message):
    proc = cli(*args)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("hybridflow-mg: error: ") and message in lines[0]

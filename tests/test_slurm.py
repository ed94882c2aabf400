"""launch/slurm/train.sbatch on a real one-node SLURM cluster (launch/slurm/local_cluster.sh starts munge,
slurmctld and slurmd; skipped with one line when they cannot start): a batch job, the preemption round
trip (SIGUSR1 → checkpoint → exit 75 → requeue → resume), and a failing job step."""
import subprocess
import time

import pytest

from tests.multirank import ROOT, worker_env
from tests.trainrun import SHORT, rows

SCRIPT = "launch/slurm/train.sbatch"


@pytest.fixture(scope="module")
def slurm():
    proc = subprocess.run(["bash", "launch/slurm/local_cluster.sh", "start"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    if proc.returncode != 0:
        pytest.skip(f"no local SLURM cluster here: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    conf = proc.stdout.strip().splitlines()[-1].split("=", 1)[1]
    yield worker_env(SLURM_CONF=conf)
    subprocess.run(["bash", "launch/slurm/local_cluster.sh", "stop"], cwd=ROOT, capture_output=True, timeout=120)


def sbatch(env, out, tasks: int, *overrides: str, wait: bool = True) -> subprocess.CompletedProcess:
    cmd = ["sbatch", "--parsable", "-N", "1", f"--ntasks-per-node={tasks}", f"--output={out}/sbatch-%j.out",
           *(["--wait"] if wait else []), SCRIPT, "configs/quickstart.yaml", *SHORT, f"run.output_dir={out}",
           *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def job_state(env, job: str) -> dict:
    text = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return dict(field.split("=", 1) for field in text.split() if "=" in field)


def test_a_batch_job_trains_and_writes_its_logs(slurm, tmp_path):
    proc = sbatch(slurm, tmp_path, 4, "trainer.total_steps=3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = proc.stdout.strip().split(";")[0]
    run = tmp_path / "quickstart"
    assert [r["step"] for r in rows(run)] == [1, 2, 3]
    logs = run / "logs" / f"slurm-{job}.0"
    assert sorted(p.name for p in logs.iterdir()) == ["batch.log", "rank0.log", "rank1.log", "rank2.log", "rank3.log"]
    assert "step    3" in (logs / "rank0.log").read_text() and "4 tasks on" in (logs / "batch.log").read_text()
    assert (run / "checkpoints" / "final" / "COMPLETE").is_file()


def test_preemption_checkpoints_requeues_and_resumes(slurm, tmp_path):
    proc = sbatch(slurm, tmp_path, 2, "parallel.train.tp=1", "trainer.total_steps=6", wait=False)
    assert proc.returncode == 0, proc.stderr
    job, run = proc.stdout.strip().split(";")[0], tmp_path / "quickstart"
    end = time.monotonic() + 600
    while not ((run / "metrics.jsonl").is_file() and len(rows(run)) >= 2):
        assert time.monotonic() < end and job_state(slurm, job).get("JobState") in ("PENDING", "RUNNING"), \
            job_state(slurm, job)
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm, check=True)  # what --signal=USR1@600 sends
    released = False
    while (state := job_state(slurm, job)).get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
        assert time.monotonic() < end, state
        if not released and state.get("Reason") == "BeginTime" and state.get("Restarts") == "1":
            # slurmctld holds a requeued job back for a while (its BeginTime); as the cluster's admin, let
            # it start now instead of waiting the hold out (what is tested is that it was requeued at all)
            # unchecked: the hold may have ended since the poll ("job is no longer pending")
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm, capture_output=True)
            released = True
        time.sleep(1)
    state = job_state(slurm, job)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", state
    assert [r["step"] for r in rows(run)] == list(range(1, 7))  # every step exactly once
    first, second = run / "logs" / f"slurm-{job}.0", run / "logs" / f"slurm-{job}.1"
    assert "requeueing job" in (first / "batch.log").read_text()
    saved = next(line for line in (first / "rank0.log").read_text().splitlines() if line.startswith("stopped by"))
    assert saved.startswith("stopped by SIGUSR1 after step")
    assert "resumed from" in (second / "rank0.log").read_text()


def test_a_failing_step_fails_the_job_and_names_the_rank(slurm, tmp_path):
    env = dict(slurm, HYBRIDFLOW_FAULT="raise:step:1:1")
    proc = sbatch(env, tmp_path, 2, "parallel.train.tp=1", "trainer.total_steps=3")
    assert proc.returncode != 0
    job = proc.stdout.strip().split(";")[0]
    batch = (tmp_path / "quickstart" / "logs" / f"slurm-{job}.0" / "batch.log").read_text()
    assert "hybridflow-mg: error: rank 1: RuntimeError: injected fault" in batch
    assert job_state(slurm, job)["JobState"] == "FAILED"
